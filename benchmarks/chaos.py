"""Search workers SIGKILLed under load: does every call succeed or get a retryable status? (issue 20)

Starts ``ofa serve`` on 127.0.0.1 (port 0) for an artifact with an accuracy predictor and a
latency target, runs ``--clients`` clients for ``--seconds`` (each alternates a search under a
random latency budget and a fetch of an already-served subnet), and SIGKILLs one search worker
(what the OOM killer does) every ``--kill-every`` seconds. Clients do not retry (``retries=0``),
so every status is seen. Prints the machine fingerprint, the calls by status, for each kill how
long until a search started after it succeeded, search and fetch latency percentiles, and the
peak memory of the server and its workers (RSS summed, sampled every 0.25 s). A probe client
calls the cheap RPCs (ListTargets, then a health Check) every 50 ms: their p99 is how long any
call waits for the server itself. With ``--slow-readers N``, N more clients open weight streams
and stop reading after the header. With ``--full-disk KIB``, the server's ``--targets-dir`` is a
tmpfs of that size (RLIMIT_FSIZE on the server where mounting is not allowed) and one more
client registers (replace=true) 12 target names in turn: each answer must be OK or
RESOURCE_EXHAUSTED, and every name whose registration was acknowledged must be on disk, whole,
at the end. A hostile client (issue 34): with ``--half-open N,M``, N connections each open M calls
(half health Checks, half searches) whose request never comes, a fresh batch every second for the
whole run (raw HTTP/2, tests/halfopen.py): the probe's health p99 and the clients' searches and
fetches are measured under it; with ``--made-up-paths K`` the server requires a token, and K calls
without one to made-up method paths go first: the size of ``/metrics`` before and after them.

    python benchmarks/chaos.py --artifact runs/demo/supernet --target this-machine [--clients 16]
        [--seconds 60] [--kill-every 10] [--slow-readers 16] [--full-disk 64] [--half-open 4,64]
        [--made-up-paths 10000] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from common import ROOT, fingerprint
from ofa_client import Client, ClientError

sys.path.insert(0, str(ROOT / "tests"))
from halfopen import HalfOpen  # noqa: E402  (test support: a raw HTTP/2 client)

RETRYABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def search_workers(pid: int) -> list[int]:
    """The server's search worker processes (multiprocessing spawn children, not its resource tracker)."""
    found = []
    for c in children(pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            found.append(c)
    return found


def rss_mb(pid: int) -> float:
    total = 0
    for p in [pid] + children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--kill-every", type=float, default=10.0, help="0: kill nothing")
    p.add_argument("--slow-readers", type=int, default=0,
                   help="also this many clients that open a weight stream, read its header and then nothing")
    p.add_argument("--full-disk", type=int, default=0, metavar="KIB",
                   help="the targets folder on a full disk of this many KiB, and a client registering targets")
    p.add_argument("--half-open", default="", metavar="N,M",
                   help="N connections, each with M calls that never send their request, renewed every second")
    p.add_argument("--made-up-paths", type=int, default=0, metavar="K",
                   help="require a token, and first send K tokenless calls to made-up method paths")
    p.add_argument("--json")
    a = p.parse_args()
    fp = fingerprint()
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(small_disk(a.full_disk)) if a.full_disk else None
        run(a, fp, disk)


@contextlib.contextmanager
def small_disk(kib: int):
    """A folder on a tmpfs of ``kib`` KiB (root, or a user namespace, may mount one), else a plain temp folder
    and a per-file size limit for the server (RLIMIT_FSIZE: writes past it fail with EFBIG)."""
    with tempfile.TemporaryDirectory(prefix="ofa-chaos-disk-") as d:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", d],
                                 capture_output=True).returncode == 0
        try:
            yield {"path": d, "kib": kib, "how": "tmpfs" if mounted else "RLIMIT_FSIZE"}
        finally:
            if mounted:
                subprocess.run(["umount", d], check=False)


def attack(port: int, shape: str, stop: threading.Event, ended: Counter) -> None:
    """Half-open calls (``N,M``: connections, calls each), half health Checks and half searches, a fresh batch
    every second until ``stop``; ``ended`` counts how the server ended them (and ``open`` the ones it had not)."""
    n, m = (int(x) for x in shape.split(","))
    paths = ["/grpc.health.v1.Health/Check", "/ofa.v1.SubnetService/SearchSubnet"]
    while not stop.is_set():
        batch = HalfOpen(port, n, m, paths).open()
        stop.wait(1.0)
        counts = batch.counts()
        batch.close()
        ended.update(counts)
        ended["open"] += batch.opened - sum(counts.values())


def made_up_paths(address: str, metrics_url: str, k: int) -> dict:
    """``k`` tokenless calls to made-up method paths: how they were answered and /metrics' size around them."""
    import urllib.request

    import grpc

    def size() -> int:
        with urllib.request.urlopen(metrics_url, timeout=30) as r:
            return len(r.read())

    before, codes = size(), Counter()
    with grpc.insecure_channel(address) as ch:
        for i in range(k):
            try:
                ch.unary_unary(f"/made.up.Service{i}/Method{i}")(b"", timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as e:
                codes[e.code().name] += 1
    return {"calls": k, "codes": dict(codes), "metrics_bytes_before": before, "metrics_bytes_after": size()}


def run(a, fp: dict, disk: dict | None) -> None:
    cmd = [sys.executable, "-m", "ofa", "serve", "--artifact", a.artifact, "--port", "0"]
    limit = None
    if disk:
        cmd += ["--targets-dir", disk["path"]]
        if disk["how"] == "RLIMIT_FSIZE":
            size = disk["kib"] << 10
            limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))  # noqa: E731
    token = "chaos-token" if a.made_up_paths else None
    token_file = Path(tempfile.mkstemp(prefix="ofa-chaos-token-")[1])
    token_file.write_text(f"{token}\n")
    port_file = token_file.with_suffix(".port.json")
    cmd += ["--metrics-port", "0", "--drain-delay-s", "0", "--port-file", str(port_file)]
    cmd += ["--token-file", str(token_file)] if token else []
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limit)
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists():  # written once the server listens
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (exit code {server.poll()})")
            time.sleep(0.2)
        where = json.loads(port_file.read_text())
        address = f"127.0.0.1:{where['port']}"
        metrics_url = f"http://127.0.0.1:{where['metrics_port']}/metrics"
        made_up = made_up_paths(address, metrics_url, a.made_up_paths) if a.made_up_paths else None
        with Client(address, token=token) as c:
            front = c.pareto(a.target, points=5)
            lo, hi = front[0].predicted_latency_ms, front[-1].predicted_latency_ms
            known = [c.search(a.target, max_latency_ms=x.predicted_latency_ms) for x in front[:3]]
            for s in known:
                c.fetch(s, "onnx")  # built once: the fetches under chaos are served from the cache
        calls: list[tuple[str, str, float, float]] = []  # kind, status, start (s since t0), seconds
        lock, stop = threading.Lock(), threading.Event()
        messages: dict[str, list[str]] = {}  # "kind status" -> the first distinct messages of calls not OK

        def failed(kind: str, e: ClientError) -> str:
            with lock:
                seen = messages.setdefault(f"{kind} {e.code}", [])
                if len(seen) < 3 and str(e)[:300] not in seen:
                    seen.append(str(e)[:300])
            return e.code
        t0 = time.monotonic()

        def client(k: int) -> None:
            rng = random.Random(k)
            with Client(address, token=token, retries=0, timeout=30) as c:
                while not stop.is_set():
                    kind = "search" if rng.random() < 0.5 else "fetch"
                    start = time.monotonic()
                    try:
                        if kind == "search":
                            c.search(a.target, max_latency_ms=rng.uniform(lo, hi), generations=100,
                                     seed=rng.randrange(1000))
                        else:
                            c.fetch(rng.choice(known), "onnx")
                        status = "OK"
                    except ClientError as e:
                        status = failed(kind, e)
                    with lock:
                        calls.append((kind, status, start - t0, time.monotonic() - start))
                    if status in RETRYABLE:
                        time.sleep(0.1)

        peak = [rss_mb(server.pid)]

        def sample_memory() -> None:
            while not stop.wait(0.25):
                peak.append(rss_mb(server.pid))

        import grpc
        from ofa_client.v1 import subnet_service_pb2 as pb
        from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc

        slow_channels, held = [], Counter()

        def slow_reader(k: int) -> None:
            """Hold a stream open after its header, reading nothing, again and again until the end."""
            ch = grpc.insecure_channel(address, [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384),
                                                 ("grpc.use_local_subchannel_pool", 1)])  # a client each
            slow_channels.append(ch)
            stub = pb_grpc.SubnetServiceStub(ch)
            req = pb.GetSubnetWeightsRequest(subnet_id=known[k % len(known)].id, format=pb.WEIGHTS_FORMAT_ONNX,
                                             supernet=known[0].supernet)
            while not stop.is_set():
                stream = stub.GetSubnetWeights(req, timeout=a.seconds + 30)
                try:
                    next(stream)
                    with lock:
                        held["holding"] += 1
                    stop.wait()
                except grpc.RpcError as e:
                    with lock:
                        held[e.code().name] += 1
                    stop.wait(0.5)
                finally:
                    stream.cancel()

        def probe() -> None:
            """The cheap RPCs, every 50 ms: how long a call waits for the server itself."""
            with Client(address, token=token, retries=0, timeout=30) as c:
                while not stop.wait(0.05):
                    for kind, call in (("probe", c.targets), ("health", c.health)):  # timed apart
                        start = time.monotonic()
                        try:
                            status = "OK" if call() not in ("NOT_SERVING", "SERVICE_UNKNOWN") else "NOT_SERVING"
                        except ClientError as e:
                            status = failed(kind, e)
                        with lock:
                            calls.append((kind, status, start - t0, time.monotonic() - start))

        acked: dict[str, str] = {}  # name -> the text of its last acknowledged registration

        def registrar() -> None:
            """Register 12 names in turn (replace=true) on the full disk: OK or RESOURCE_EXHAUSTED, nothing lost."""
            table = json.loads((Path(a.artifact) / "latency" / f"{a.target}.json").read_text())
            with Client(address, token=token, retries=0, timeout=30) as c:
                k = 0
                while not stop.is_set():
                    name = f"disk-{k % 12}"
                    text = json.dumps({**table, "target": name})
                    start = time.monotonic()
                    try:
                        c.register_target(text, replace=True)
                        status = "OK"
                        acked[name] = text
                    except ClientError as e:
                        status = e.code
                    with lock:
                        calls.append(("register", status, start - t0, time.monotonic() - start))
                    k += 1
                    stop.wait(0.1)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
        threads.append(threading.Thread(target=probe))
        if disk:
            threads.append(threading.Thread(target=registrar))
        threads += [threading.Thread(target=slow_reader, args=(k,)) for k in range(a.slow_readers)]
        threads.append(threading.Thread(target=sample_memory))
        half_open: Counter = Counter()  # how the attacker's calls ended
        if a.half_open:
            threads.append(threading.Thread(target=attack, args=(int(address.split(":")[1]), a.half_open, stop,
                                                                 half_open)))
        for t in threads:
            t.start()
        kills = []
        while time.monotonic() - t0 < a.seconds:
            time.sleep(min(a.kill_every or a.seconds, max(0.0, a.seconds - (time.monotonic() - t0))))
            if not a.kill_every:
                continue
            workers = search_workers(server.pid)
            if workers and time.monotonic() - t0 < a.seconds:
                victim = random.Random(len(kills)).choice(workers)
                os.kill(victim, signal.SIGKILL)
                kills.append(time.monotonic() - t0)
        stop.set()
        for t in threads:
            t.join(60)
        for ch in slow_channels:
            ch.close()
    finally:
        token_file.unlink(missing_ok=True)
        port_file.unlink(missing_ok=True)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    by = Counter((k, s) for k, s, _, _ in calls)
    bad = {f"{k} {s}": n for (k, s), n in by.items() if s != "OK" and s not in RETRYABLE}
    recovery = []
    for t_kill in kills:
        ok_after = [start + dt for k, s, start, dt in calls if k == "search" and s == "OK" and start >= t_kill]
        recovery.append(min(ok_after) - t_kill if ok_after else float("inf"))
    lat = {kind: np.array([dt for k, s, _, dt in calls if k == kind and s == "OK"])
           for kind in ("search", "fetch", "probe", "health", "register")}
    lost = []
    if disk:  # every acknowledged registration is on disk, whole (the server has stopped: nothing is in flight)
        for name, text in acked.items():
            files = list(Path(disk["path"]).rglob(f"{name}.json"))
            if not files or json.loads(files[0].read_text()) != json.loads(text):
                lost.append(name)
        disk["leftovers"] = sorted(f.name for f in Path(disk["path"]).rglob("*") if f.is_file()
                                   and not f.name.endswith(".json"))
    print(f"{a.clients} clients for {a.seconds:.0f} s, a search worker SIGKILLed every {a.kill_every:.0f} s "
          f"({len(kills)} kills), {a.slow_readers} slow readers; server {address}")
    if disk:
        print(f"  targets folder on a full disk ({disk['how']}, {disk['kib']} KiB): {len(acked)} names acknowledged, "
              f"{len(lost)} of them lost {lost if lost else ''}; files left that are not tables: {disk['leftovers']}")
    if a.slow_readers:
        print("  slow readers' streams: " + ", ".join(f"{k} {n}" for k, n in sorted(held.items())))
    print("  calls: " + ", ".join(f"{k} {s} {n}" for (k, s), n in sorted(by.items())))
    print(f"  neither OK nor retryable: {sum(bad.values())} {bad if bad else ''}")
    for key, texts in sorted(messages.items()):
        if not key.endswith("RESOURCE_EXHAUSTED"):
            print(f"  {key}: " + " | ".join(texts))
    print("  a search started after each kill succeeded within: " + ", ".join(f"{r:.2f} s" for r in recovery)
          + f" (worst {max(recovery, default=0):.2f} s; goal 5 s)")
    for kind, x in lat.items():
        if len(x):
            print(f"  {kind} OK: {len(x)} calls, p50 {1000 * np.median(x):.0f} ms, p99 {1000 * np.quantile(x, .99):.0f} ms")
    print(f"  peak memory, server and its workers: {max(peak):.0f} MiB (at start {peak[0]:.0f} MiB)")
    if a.half_open:
        print(f"  half-open calls ({a.half_open} a second) ended by the server: " + ", ".join(
            f"{k} {n}" for k, n in sorted(half_open.items())) + " (status-14: UNAVAILABLE; reset: RST_STREAM)")
    if made_up:
        print(f"  {made_up['calls']} tokenless calls to made-up paths: {made_up['codes']}; /metrics "
              f"{made_up['metrics_bytes_before']:,} bytes before, {made_up['metrics_bytes_after']:,} after")
    if a.json:
        json.dump({"fingerprint": fp, "clients": a.clients, "seconds": a.seconds, "kills": kills,
                   "slow_readers": a.slow_readers, "slow_reader_streams": dict(held),
                   "p99_ms": {k: 1000 * float(np.quantile(x, .99)) for k, x in lat.items() if len(x)},
                   "calls": {f"{k} {s}": n for (k, s), n in by.items()}, "not_retryable": bad,
                   "recovery_s": recovery, "peak_rss_mb": max(peak), "full_disk": disk, "lost": lost,
                   "half_open": a.half_open, "half_open_ended": dict(half_open), "made_up_paths": made_up,
                   "messages": messages},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
