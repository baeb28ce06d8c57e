"""What a hostile client does to a server (issue 34): calls that never send their request, made-up method
paths. Real servers on 127.0.0.1 with OS-chosen ports; the attacks are bounded in count and time."""
import contextlib
import json
import logging
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from conftest import served_copy, until
from halfopen import HalfOpen
from ofa_client import Client, Unauthenticated
from ofa_server.auth import Tokens
from ofa_server.guard import Waiting
from ofa_server.main import SERVICE, ServeConfig, Server
from ofa_server.registry import Registry

TARGET = "synthetic-cpu"


@pytest.fixture(scope="module")
def artifact(tiny_artifact, tmp_path_factory):
    return served_copy(tiny_artifact, tmp_path_factory.mktemp("hostile") / "tiny", TARGET)


class _Context:
    """A stand-in for a call's context: its peer, and whether it was ended."""

    def __init__(self, peer: str) -> None:
        self._peer, self.cancelled = peer, False

    def peer(self) -> str:
        return self._peer

    def cancel(self) -> None:
        self.cancelled = True


def test_waiting_calls_are_bounded_per_connection_address_and_in_all_the_oldest_ended_first():
    ended = []
    w = Waiting(timeout=3600, per_connection=2, per_address=3, total=4, on_end=ended.append, min_age=0.2)
    try:
        a = [_Context("ipv4:10.0.0.1:1000") for _ in range(3)]
        keys = [w.enter(c) for c in a]
        time.sleep(0.05)
        assert w.count == 3 and not any(c.cancelled for c in a)  # a burst is not ended: none has waited 0.2 s
        until(lambda: a[0].cancelled, 10, "the connection's oldest waiter to be ended")
        assert [c.cancelled for c in a] == [True, False, False] and w.count == 2 and not w.leave(keys[0])
        b = [_Context(f"ipv4:10.0.0.1:{2000 + i}") for i in range(2)]
        for c in b:
            w.enter(c)
        until(lambda: a[1].cancelled, 10, "the address's oldest waiter to be ended")
        assert not a[2].cancelled and w.count == 3
        others = [_Context(f"ipv6:[::1]:{3000 + i}") for i in range(2)]
        for c in others:
            w.enter(c)
        until(lambda: a[2].cancelled, 10, "the server's oldest waiter to be ended")
        assert w.count == 4 and not any(c.cancelled for c in b + others)
        assert ended == ["crowded"] * 3 and not w.leave(keys[2])  # an ended call is not served
    finally:
        w.close()
    late = Waiting(timeout=0.2, per_connection=8, per_address=8, total=8, on_end=ended.append)
    try:
        c = _Context("ipv4:10.0.0.2:1")
        key = late.enter(c)
        until(lambda: ended[-1:] == ["timeout"] and c.cancelled, 10, "the call whose request never came to end")
        assert late.count == 0 and not late.leave(key)
    finally:
        late.close()


def test_a_connection_that_delivered_before_gets_patience_a_fresh_one_does_not():
    """On a saturated machine a well-behaved client's request can take longer than the crowding age: its lone
    call waits ten times longer, if its connection has sent requests before; a fresh connection's does not."""
    ended = []
    w = Waiting(timeout=3600, per_connection=8, per_address=1, total=8, on_end=ended.append, min_age=0.1)
    try:
        known, fresh = _Context("ipv4:10.0.0.1:1"), [_Context(f"ipv4:10.0.0.1:{2 + i}") for i in range(2)]
        assert w.leave(w.enter(known))  # its request came
        assert w.leave(w.enter(fresh[1]), delivered=False)  # a call that ended without one earns nothing
        w.enter(known)  # its next call: slow to arrive
        for c in fresh:
            w.enter(c)
        until(lambda: all(c.cancelled for c in fresh), 10, "the fresh connections' waiters to be crowded out")
        time.sleep(0.1)  # past the crowding age, well within the patience (1 s)
        assert not known.cancelled and ended == ["crowded"] * 2
    finally:
        w.close()


def _metrics(srv: Server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_half_open_calls_are_ended_and_never_starve_health_nor_searches(artifact):
    srv = Server(Registry([str(artifact)]), ServeConfig(port=0, max_searches=2, body_timeout_s=2.0,
                                                        metrics_port=0)).start()
    attack = None
    try:
        until(lambda: srv.service.pool.ready > 0, 120, "a search worker")
        # 2 connections x 64 calls, half health Checks, half searches, none with its request
        attack = HalfOpen(srv.port, 2, 64, ["/grpc.health.v1.Health/Check", f"/{SERVICE}/SearchSubnet"]).open()
        time.sleep(0.5)  # the burst taken in (the connections stay open, their calls silent)
        with Client(f"127.0.0.1:{srv.port}", retries=0) as c:
            assert [c.health() for _ in range(20)] == ["SERVING"] * 20
            assert c.search(generations=5).id
            assert c.health() == "SERVING"
        until(lambda: sum(attack.counts().values()) >= attack.opened, 60, "every half-open call ended")
        counts = attack.counts()
        # 14: UNAVAILABLE (ended, timed out or crowded out); 8: RESOURCE_EXHAUSTED (refused: a queue was full)
        assert set(counts) <= {"status-14", "status-8", "reset"} and counts["status-14"] > 0, counts
        ended = [line for line in _metrics(srv).splitlines() if line.startswith("ofa_calls_ended_waiting_total{")]
        assert sum(float(line.split()[-1]) for line in ended) >= counts["status-14"], ended
        with Client(f"127.0.0.1:{srv.port}", retries=0) as c:  # and afterwards all is as before
            assert c.health() == "SERVING" and c.search(generations=5).id
    finally:
        if attack is not None:
            attack.close()
        srv.stop(0)


def test_made_up_method_paths_share_one_metric_label_and_a_tokenless_call_is_refused_without_its_body(
        artifact, tmp_path):
    token = tmp_path / "tokens"
    token.write_text("alice s3cret\n")
    srv = Server(Registry([str(artifact)]), ServeConfig(port=0, metrics_port=0),
                 tokens=Tokens.from_file(token)).start()
    attack = None
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        for i in range(300):
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(f"/made.up.Service{i}/Method{i}")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        before = _metrics(srv)
        for i in range(300, 600):
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(f"/made.up.Service{i}/Method{i}")(b"", timeout=10)
        after = _metrics(srv)
        channel.close()
        assert "made.up" not in after and "Method3" not in after
        assert 'rpc="unknown"' in after and len(after.splitlines()) == len(before.splitlines())
        # a call without a token is refused at once, whether or not its request ever comes
        attack = HalfOpen(srv.port, 1, 8, [f"/{SERVICE}/SearchSubnet"]).open()
        until(lambda: sum(attack.counts().values()) >= attack.opened, 30, "the tokenless calls refused")
        assert attack.counts() == {"status-16": attack.opened}  # 16: UNAUTHENTICATED
    finally:
        if attack is not None:
            attack.close()
        srv.stop(0)


def _children(pid: int) -> list[int]:
    """The search workers of the server ``pid`` (multiprocessing's spawned children, not its resource tracker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                cmd = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                    out.append(int(child))
    return out


def _search_in_thread(address: str, token: str, **kwargs):
    out: dict = {}

    def run():
        try:
            with Client(address, token=token, retries=0, timeout=300) as c:
                out["value"] = c.search(**kwargs)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_sighup_reloads_tokens_and_a_drain_finishes_searches_that_ctrl_c_reached_the_workers_of(artifact, tmp_path):
    from ofa.jobs.service import ServerProcess

    tokens = tmp_path / "tokens"
    tokens.write_text("alice first\n")
    # a grace long enough for the search the drain finishes: a worker at nice 10 beside a busy process took 27-36 s
    extra = ["--token-file", str(tokens), "--drain-delay-s", "3", "--max-searches", "2", "--max-per-peer", "2",
             "--grace", "600"]
    with ServerProcess([artifact], tmp_path / "serve.log", extra=extra) as srv:
        where = json.loads((tmp_path / "serve.port.json").read_text())  # the port, handed over as a value
        assert where["pid"] == srv.proc.pid and srv.address == f"127.0.0.1:{where['port']}"
        with Client(srv.address, token="first") as c:
            until(lambda: c.health() == "SERVING", 120, "the server to be ready")
            assert c.search(generations=3).id
        tokens.write_text("alice second\n")  # a revoked token and a new one
        srv.proc.send_signal(signal.SIGHUP)
        with Client(srv.address, token="first", retries=0) as old, Client(srv.address, token="second") as new:
            until(lambda: _refused(old), 30, "the revoked token to be refused")
            assert new.search(generations=3).id
            tokens.write_text("alice second extra words\n")  # a bad file keeps the tokens read before
            srv.proc.send_signal(signal.SIGHUP)
            until(lambda: "keeping the tokens read before" in srv.log_path.read_text(), 30, "the reload refused")
            assert new.search(generations=3).id and _refused(old)
        # a long search, then Ctrl-C reaches every process of the terminal's group (the workers too), then the
        # server: health says NOT_SERVING at once, calls are still answered during the delay, the search ends OK
        t, out = _search_in_thread(srv.address, "second", population=600, generations=2000, seed=1)  # seconds
        until(lambda: len(_children(srv.proc.pid)) >= 2, 30, "the search workers")
        time.sleep(1.0)
        for pid in _children(srv.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        srv.proc.send_signal(signal.SIGINT)
        with Client(srv.address, token="second", retries=0) as c:
            until(lambda: c.health() == "NOT_SERVING", 10, "health to say NOT_SERVING")
            assert c.search(generations=3).id  # still answered during the drain's delay
        t.join(300)
        assert "value" in out, out
        assert srv.proc.wait(120) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "replacing it" not in log  # no worker died of the Ctrl-C


def _refused(client: Client) -> bool:
    try:
        client.targets()
    except Unauthenticated:
        return True
    return False


def test_a_second_signal_during_a_drain_stops_at_once(artifact, tmp_path):
    from ofa.jobs.service import ServerProcess

    with ServerProcess([artifact], tmp_path / "serve.log", extra=["--drain-delay-s", "60"]) as srv:
        with Client(srv.address) as c:
            until(lambda: c.health() == "SERVING", 120, "the server to be ready")
        srv.proc.send_signal(signal.SIGTERM)
        until(lambda: "NOT_SERVING for 60.0 s" in srv.log_path.read_text(), 30, "the drain to begin")
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0  # not the 60 s of the delay
    assert "stopping now" in (tmp_path / "serve.log").read_text()


@contextlib.contextmanager
def _handlers_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_signal_before_the_server_starts_drains_it_once_started(artifact, caplog):
    # the race a CI run lost: health answered SERVING, a SIGTERM came before the handlers were installed, and
    # the default action ended the server with no drain. They are now installed before the server starts.
    from ofa_server.lifecycle import Signals

    config = ServeConfig(port=0, drain_delay_s=0.0, grace=5.0)
    server = Server(Registry([str(artifact)]), config)
    try:
        with _handlers_restored():
            caplog.set_level(logging.INFO, logger="ofa_server")
            signals = Signals(config, None)
            os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread before the next line runs
            assert signals.draining.is_set() and not signals.done.is_set()
            server.start()
            signals.serve(server)  # returns once the drain has stopped the server
    finally:
        server.stop(0)
    assert "NOT_SERVING for 0.0 s" in caplog.text


def test_a_signal_while_the_search_workers_start_exits_at_once_and_kills_them(artifact, monkeypatch, capsys):
    # a Ctrl-C while the pool started its workers left `ofa serve` waiting at its exit, for good, on workers that
    # waited on pipes its traceback held open; a SIGTERM then ended it with no word. Now: one line, 128 + the
    # signal, and the workers started so far killed.
    from ofa.cli import main as ofa_main
    from ofa_server.searcher import SearchPool

    started, real_spawn = [], SearchPool._spawn

    def spawn_then_signal(self):
        w = real_spawn(self)
        started.append(w.proc)
        if len(started) == 2:  # the second of three started: the signal comes as the pool starts
            os.kill(os.getpid(), signal.SIGTERM)
        return w

    monkeypatch.setattr(SearchPool, "_spawn", spawn_then_signal)
    with _handlers_restored():
        code = ofa_main(["serve", "--artifact", str(artifact), "--port", "0", "--max-searches", "3"])
    assert code == 128 + signal.SIGTERM and len(started) == 2
    assert "ofa serve: interrupted (signal 15 while starting: nothing was served)" in capsys.readouterr().err
    for proc in started:
        proc.join(30)
        assert not proc.is_alive()


def test_a_server_whose_parent_is_killed_stops_by_itself(artifact, tmp_path):
    """`ofa report` killed with SIGKILL left its `ofa serve` child serving, for good: --stop-with-parent (which
    ServerProcess passes) drains it once its parent is gone."""
    import subprocess
    import sys

    port_file, log = tmp_path / "port.json", tmp_path / "serve.log"
    serve = [sys.executable, "-m", "ofa", "serve", "--artifact", str(artifact), "--port", "0", "--drain-delay-s", "0",
             "--port-file", str(port_file), "--stop-with-parent"]
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.Popen(sys.argv[1:], "
                               f"stdout=open({str(log)!r}, 'w'), stderr=subprocess.STDOUT).wait()", *serve])
    try:
        until(port_file.exists, 120, "the server to listen")
        pid = json.loads(port_file.read_text())["pid"]
        with Client(f"127.0.0.1:{json.loads(port_file.read_text())['port']}") as c:
            until(lambda: c.health() == "SERVING", 120, "the server to be ready")
        parent.kill()
        parent.wait(30)

        def gone() -> bool:  # exited (a zombie until someone reaps it counts as gone)
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True
        until(gone, 60, "the orphaned server to stop")
    finally:
        parent.kill()
    text = log.read_text()
    assert "is gone: stopping" in text and "stopped" in text


def test_the_client_refuses_weights_of_another_supernet_than_its_search_ran_on(artifact, tmp_path):
    from dataclasses import replace

    from ofa_client import SupernetMismatch
    from ofa_client.cli import main as client_main

    srv = Server(Registry([str(artifact)]), ServeConfig(port=0)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            found = c.search(generations=3)
            assert len(found.supernet_digest) == 64 and c.fetch(found).supernet_digest == found.supernet_digest
            other = replace(found, supernet_digest="0" * 64)  # what a replica of another artifact version answers
            with pytest.raises(SupernetMismatch, match="search again"):
                c.fetch(other)
            with pytest.raises(SupernetMismatch):
                c.fetch(other.to_dict())
            assert c.fetch(replace(found, supernet_digest="")).data  # a result of an older server: not checked
        result = tmp_path / "found.json"
        result.write_text(json.dumps(other.to_dict()))
        code = client_main(["--address", f"127.0.0.1:{srv.port}", "fetch", "--arch", f"@{result}",
                            "--out", str(tmp_path / "w.safetensors")])
        assert code == SupernetMismatch.exit_code == 9 and not (tmp_path / "w.safetensors").exists()
    finally:
        srv.stop(0)


def test_limits_count_a_token_s_client_on_all_its_connections_and_other_clients_apart(artifact, tmp_path):
    from ofa_client import ResourceExhausted

    tokens = tmp_path / "tokens"
    tokens.write_text("alice a-token\nbob b-token\n")
    srv = Server(Registry([str(artifact)]), ServeConfig(port=0, max_searches=2),
                 tokens=Tokens.from_file(tokens)).start()
    address = f"127.0.0.1:{srv.port}"
    try:
        t, out = _search_in_thread(address, "a-token", population=600, generations=2000)
        until(lambda: srv.service.searches_running == 1, 60, "alice's long search")
        with Client(address, token="a-token", retries=0) as again:  # a second connection of alice's
            with pytest.raises(ResourceExhausted, match=r"this client \(client alice\) already runs 1 searches"):
                again.search(generations=3)
        with Client(address, token="b-token", retries=0) as bob:
            assert bob.search(generations=3).id
    finally:
        srv.stop(0)
        t.join(60)
