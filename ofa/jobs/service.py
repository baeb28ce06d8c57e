"""The product's service driven as a user drives it: ``ofa serve`` in a child process, ``ofa-client`` calls."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["ReportError", "ServerProcess", "ofa_client", "tree_cpu_seconds"]

IDLE_SHARE = 0.02  # of one core, over IDLE_WINDOW_S: below this a server's processes count as idle
IDLE_WINDOW_S = 0.5


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid`` and all its descendants (Linux /proc; None
    where it cannot be read). Finished children that were waited for count in their parent's cutime/cstime."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # gone meanwhile
                stats[int(entry)] = (int(fields[1]), sum(int(v) for v in fields[11:15]))  # ppid; u, s, cu, cs
    except (OSError, ValueError, IndexError):
        return None
    if pid not in stats:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in stats.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(stats[p][1] for p in tree) / tick


class ReportError(RuntimeError):
    """A step of the report failed; the message says which and where its log is."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ServerProcess:
    """``ofa serve`` in a child process on 127.0.0.1 and an OS-chosen port; SIGTERM on exit."""

    def __init__(self, artifacts: Sequence[Path], log_path: Path, startup_timeout: float = 300.0,
                 extra: Sequence[str] = ()) -> None:
        # the ofa command's own interface: this is what a user types
        # --stop-with-parent: this process killed (SIGKILL, or a SIGTERM that runs no __exit__) leaves no server
        self.cmd = [sys.executable, "-m", "ofa", "serve", "--host", "127.0.0.1", "--port", "0", "--drain-delay-s", "0",
                    "--stop-with-parent"]
        for a in artifacts:
            self.cmd += ["--artifact", str(a)]
        self.log_path, self.timeout = Path(log_path), startup_timeout
        self.port_file = self.log_path.with_name(self.log_path.stem + ".port.json")  # the server writes it
        self.cmd += ["--port-file", str(self.port_file)]
        self.cmd += list(extra)  # more of the command's own arguments
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def __enter__(self) -> "ServerProcess":
        self.port_file.unlink(missing_ok=True)  # a file of an earlier run is not this server's port
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        try:  # a Ctrl-C while it starts stops it too
            self._await_port()
        except BaseException:
            self.stop()
            raise
        return self

    def _await_port(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.port_file.exists():  # written atomically once the server listens
                self.address = f"127.0.0.1:{json.loads(self.port_file.read_text())['port']}"
                return
            if self.proc.poll() is not None:
                raise ReportError(f"ofa serve exited with code {self.proc.returncode} before listening; "
                                  f"see {self.log_path}")
            time.sleep(0.2)
        raise ReportError(f"ofa serve did not listen within {self.timeout:.0f} s; see {self.log_path}")

    def wait_idle(self, timeout: float = 60.0) -> str:
        """Wait until the server's processes (the server and its search workers) use less than
        :data:`IDLE_SHARE` of a core over :data:`IDLE_WINDOW_S`, so that what is timed next measures the
        machine, not the server starting; at most ``timeout`` seconds. Returns what it found, for the log."""
        t0 = time.monotonic()
        last = tree_cpu_seconds(self.proc.pid) if self.proc is not None else None
        if last is None:
            return "the server's CPU use cannot be read here (no /proc): not waiting for it to be idle"
        while time.monotonic() - t0 < timeout:
            time.sleep(IDLE_WINDOW_S)
            now = tree_cpu_seconds(self.proc.pid)
            if now is None:
                raise ReportError(f"ofa serve exited with code {self.proc.poll()}; see {self.log_path}")
            share, last = (now - last) / IDLE_WINDOW_S, now
            if share < IDLE_SHARE:
                return (f"the server is idle ({share:.1%} of a core over {IDLE_WINDOW_S:g} s) after "
                        f"{time.monotonic() - t0:.1f} s: timing now")
        return (f"the server still used {share:.0%} of a core after {timeout:.0f} s; timing anyway (the "
                f"repeatability check will say whether it disturbed the timing)")

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM (in-flight calls finish), then wait; kill only if it hangs. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def _client_command() -> list[str]:
    exe = Path(sys.executable).with_name("ofa-client")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ofa_client.cli"]


def ofa_client(address: str, *args: str, log: Callable[[str], None] = lambda s: None) -> Any:
    """Run ``ofa-client --json ARGS`` against ``address``; its JSON output, or ReportError with its message."""
    log(f"  $ ofa-client {' '.join(args)}")
    r = subprocess.run([*_client_command(), "--address", address, "--json", *args], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    if r.returncode:
        raise ReportError(f"ofa-client {args[0]} exited with code {r.returncode}: {r.stderr.strip()}", r.returncode)
    return json.loads(r.stdout)
