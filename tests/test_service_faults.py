"""What production does to a server: search workers killed (the OOM killer) or stopped (SIGSTOP, a hang).

Real servers on 127.0.0.1 with OS-chosen ports; every wait is bounded.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import served_copy, synthetic_table, until
from ofa import _io
from ofa.artifact import load_artifact
from ofa.search import Constraints, SearchSettings
from ofa_client import (Client, ClientError, DeadlineExceeded, Infeasible, InvalidArgument, NotFound, PermissionDenied,
                        ResourceExhausted, Unauthenticated, Unavailable)
from ofa_client.cli import main as client_main
from ofa_client.v1 import subnet_service_pb2 as pb
from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc
from ofa_server.auth import Tokens
from ofa_server.main import ServeConfig, Server
from ofa_server.registry import Registry
from ofa_server.searcher import SearchJob, SearchPool, WorkerLost

TARGET = "synthetic-cpu"
LONG = {"population": 600, "generations": 2000}  # tens of seconds: long enough to be hit mid-search


@pytest.fixture(scope="module")
def artifact(tiny_artifact, tmp_path_factory):
    return served_copy(tiny_artifact, tmp_path_factory.mktemp("served") / "tiny", TARGET)


@pytest.fixture()
def server(artifact):
    srv = Server(Registry([str(artifact)], None), ServeConfig(port=0, max_searches=2)).start()
    yield srv
    srv.stop(0)


def _busy_pid(pool: SearchPool) -> int:
    until(pool.busy_worker_pids, 60, "a search on a worker")
    return pool.busy_worker_pids()[0]


def _in_thread(fn):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_a_killed_worker_is_replaced_its_call_is_retryable_and_the_client_retries_it(server):
    pool, address = server.service.pool, f"127.0.0.1:{server.port}"
    with Client(address, retries=0) as once, Client(address) as c:
        t, out = _in_thread(lambda: once.search(**LONG))
        os.kill(_busy_pid(pool), signal.SIGKILL)  # what the OOM killer does
        t.join(60)
        assert isinstance(out.get("error"), Unavailable), out
        assert "died" in str(out["error"]) and "retry" in str(out["error"])
        assert c.health() == "SERVING"  # the other worker can take searches meanwhile
        assert c.search(generations=5).id
        until(lambda: pool.ready == 2, what="the replacement worker")
        assert pool.restarts == 1
        # with the default client, a kill mid-search costs a retry, not an error
        t, out = _in_thread(lambda: c.search(population=200, generations=400, seed=1))
        os.kill(_busy_pid(pool), signal.SIGKILL)
        t.join(120)
        assert "value" in out and out["value"].id, out
        until(lambda: pool.ready == 2 and pool.restarts == 2, what="the second replacement")
        assert c.search(generations=5, seed=2).id


def test_health_is_not_serving_only_while_no_worker_can_search(server, monkeypatch):
    pool, address = server.service.pool, f"127.0.0.1:{server.port}"
    # the replacements start at once but are taken on only after the test's search: without the gate, a fast
    # restart could end between "no worker ready" and the search (it did, once)
    gate, await_ready = threading.Event(), pool._await_ready
    monkeypatch.setattr(pool, "_await_ready", lambda w: gate.wait(60) and await_ready(w))
    with Client(address, retries=0) as c:
        assert c.health() == "SERVING"
        for pid in pool.worker_pids():
            os.kill(pid, signal.SIGKILL)
        until(lambda: c.health() == "NOT_SERVING", 30, "NOT_SERVING")
        assert pool.ready == 0  # replacing both: a search is told to come back, not failed for good
        with pytest.raises(Unavailable, match="no search worker is ready"):
            c.search(generations=5)
        gate.set()
        until(lambda: c.health() == "SERVING", 120, "SERVING again")
        assert c.search(generations=5).id and pool.restarts == 2


def test_a_job_that_failed_to_reach_its_worker_never_keeps_it_busy(server, monkeypatch):
    """A task that cannot be sent (a pickle failing halfway, as a table nested ~1000 deep did) leaves the pipe in
    an unknown state: the worker is replaced, never kept busy (two such searches once took the whole pool)."""
    pool, address = server.service.pool, f"127.0.0.1:{server.port}"
    send, failed = pool._send, []

    def broken(w, task):
        if not failed:
            failed.append(w)
            raise RecursionError("maximum recursion depth exceeded while pickling an object")
        return send(w, task)

    monkeypatch.setattr(pool, "_send", broken)
    with Client(address, retries=0) as c:
        with pytest.raises(ClientError, match="internal error in SearchSubnet"):
            c.search(generations=5)
        until(lambda: pool.ready == 2 and pool.restarts == 1, 120, "the worker replaced")
        assert not pool.busy_worker_pids() and failed[0].proc.pid not in pool.worker_pids()
        assert c.search(generations=5).id


def test_a_stopped_worker_is_killed_after_the_deadline_and_replaced(server):
    pool, address = server.service.pool, f"127.0.0.1:{server.port}"
    pool.stop_grace = 1.0
    with Client(address, retries=0) as c:
        t, out = _in_thread(lambda: c.search(timeout=3.0, **LONG))
        pid = _busy_pid(pool)
        os.kill(pid, signal.SIGSTOP)  # hung: it can neither finish nor see the stop flag
        t.join(60)
        assert isinstance(out.get("error"), DeadlineExceeded), out
        until(lambda: pool.restarts == 1 and pool.ready == 2, 60, "the stuck worker replaced")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert c.search(generations=5).id


def test_a_search_past_the_servers_limit_frees_its_worker(artifact):
    pool = SearchPool(1, (str(artifact),), max_seconds=1.0)
    try:
        long = SearchJob(Constraints(), TARGET, SearchSettings(population=600, generations=2000))
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match="limit of 1 s"):
            pool.run(long, str(artifact))
        assert time.monotonic() - t0 < 30
        until(lambda: pool.ready == 1, what="the replacement")
        result = pool.run(SearchJob(Constraints(), TARGET, SearchSettings(generations=5)), str(artifact))
        assert result.best.arch.id
        # the deadline travels with the job: the worker stops at it by itself
        t0 = time.monotonic()
        with pytest.raises(Exception, match="stop|cancel"):
            pool.run(long, str(artifact), deadline=time.monotonic() + 0.5)
        assert time.monotonic() - t0 < 10 and pool.restarts == 1
    finally:
        pool.close()


def test_a_pool_whose_worker_does_not_start_says_why_and_leaves_none(artifact, monkeypatch):
    from ofa_server.searcher import WorkerStartError

    started, real_spawn = [], SearchPool._spawn
    monkeypatch.setattr(SearchPool, "_spawn", lambda self: started.append(real_spawn(self)) or started[-1])
    with pytest.raises(WorkerStartError, match="search worker 0 did not say it was ready within 0 s"):
        SearchPool(2, (str(artifact),), start_timeout=0.001)  # an OSError: `ofa serve` says it in one line
    for w in started:
        w.proc.join(30)
        assert not w.proc.is_alive()


def test_a_worker_whose_server_is_gone_stops_its_search(artifact):
    # a server SIGKILLed mid-search left its worker searching for its whole deadline (80 s of a core, seen): the
    # worker checks that its parent is still the one that started it, as it checks its stop flag
    from ofa.search.load import load_scorer
    from ofa_server.search_worker import Task, _WorkerState

    state = _WorkerState([0], 16, {str(artifact): load_scorer(str(artifact))})
    long = SearchJob(Constraints(), TARGET, SearchSettings(population=600, generations=2000))
    state.parent = -1  # what os.getppid() gives no longer: the server that started it is gone
    with pytest.raises(Exception, match="stop|cancel"):
        state.run(Task(long, str(artifact), None, None, 0, None))


def test_a_registered_table_crosses_to_a_worker_once_and_again_when_it_was_dropped(artifact):
    space = load_artifact(artifact).space
    pool = SearchPool(1, (str(artifact),), tables_kept=1)  # the worker keeps one registered table
    try:
        sent = []
        for version, name in ((7, "registered-x"), (7, "registered-x"), (9, "registered-y"), (7, "registered-x")):
            job = SearchJob(Constraints(), name, SearchSettings(generations=5))
            found = pool.run(job, str(artifact), table=(version, synthetic_table(space, name)))
            assert found.best.latency_ms is not None
            sent.append(pool.tables_sent)
        # 7 once; 9 pushes it out of the worker, which asks for it again when it is named by version alone
        assert sent == [1, 1, 2, 3]
    finally:
        pool.close()


def test_the_torchscript_child_is_isolated_and_time_limited(artifact, tmp_path, monkeypatch):
    from ofa import export
    from ofa.artifact import load_artifact
    art = load_artifact(artifact)
    arch = art.space.smallest(min(art.space.resolutions))
    # a module named like one the child imports, in the working directory and on PYTHONPATH
    for name in ("torch", "safetensors", "ofa"):
        (tmp_path / f"{name}.py").write_text("raise SystemExit('imported from the working directory')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    payload = export.subnet_file(art, arch, "torchscript")
    assert payload.data[:2] == b"PK"  # a torch zip, made by the real torch
    monkeypatch.setattr(export, "SCRIPT_TIMEOUT_S", 0.01)
    with pytest.raises(TimeoutError, match="longer than 0.01 s"):
        export.subnet_file(art, arch, "torchscript")
    # its process killed by a signal (the OOM killer, an operator): a retry can succeed, so UNAVAILABLE
    monkeypatch.setattr(export, "SCRIPT_TIMEOUT_S", 300.0)
    monkeypatch.setattr(export.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, -9, b"", b""))
    with pytest.raises(export.ExportKilled, match=r"killed \(signal 9\); retry") as killed:
        export.subnet_file(art, arch, "torchscript")
    from ofa_server.status import _status

    assert _status(killed.value, None, "GetSubnetWeights")[0] == grpc.StatusCode.UNAVAILABLE


def _table_text(artifact, name, **extra):
    return json.dumps({**synthetic_table(load_artifact(artifact).space, name), **extra})


def test_a_table_replaced_in_the_same_timestamp_tick_is_read_again(artifact, tmp_path):
    """Another replica replaces a table by rename with one of the same size, and the folder's clock (coarse on
    older kernels) gives it the same mtime: the scan keyed on (mtime, size) served the old table."""
    targets = tmp_path / "targets"
    srv = Server(Registry([str(artifact)], str(targets)), ServeConfig(port=0)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            c.register_target(_table_text(artifact, "swap", device={"cpu": "cpu-a", "threads": 1}))
            (t,) = [t for t in c.targets() if t["name"] == "swap"]
            assert t["cpu"] == "cpu-a"
            path = next(targets.iterdir()) / "swap.json"
            old, new = path.stat(), path.parent / ".swap.new"
            new.write_text(path.read_text().replace('"cpu-a"', '"cpu-b"'))
            os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))
            os.replace(new, path)
            assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
            (t,) = [t for t in c.targets() if t["name"] == "swap"]
            assert t["cpu"] == "cpu-b"
    finally:
        srv.stop(0)


def test_the_targets_folder_is_untrusted_storage(artifact, tmp_path):
    targets = tmp_path / "targets"
    srv = Server(Registry([str(artifact)], str(targets), max_targets=3), ServeConfig(port=0)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            c.register_target(_table_text(artifact, "good", evil="x" * 1000))
            folder = next(targets.iterdir())
            stored = json.loads((folder / "good.json").read_text())
            assert "evil" not in stored and stored["target"] == "good"  # unknown keys are not kept
            # what else lands in a shared folder: a FIFO, a link to /dev/zero, a huge junk file, a link to a table
            os.mkfifo(folder / "fifo.json")
            (folder / "zero.json").symlink_to("/dev/zero")
            with open(folder / "junk.json", "wb") as f:
                f.truncate(9 << 20)
            (folder / "link.json").symlink_to(folder / "good.json")
            t, out = _in_thread(lambda: c.targets())
            t.join(30)
            assert not t.is_alive() and [x["name"] for x in out["value"] if x["source"] == "registered"] == ["good"]
            scanned = srv.service.registry.scanned_files()  # path -> whether it held a valid table
            assert scanned[folder / "junk.json"] is False and scanned[folder / "fifo.json"] is False
            (folder / "junk.json").unlink()  # gone (another replica removed it): forgotten at the next scan
            c.targets()
            scanned = srv.service.registry.scanned_files()
            assert folder / "junk.json" not in scanned and folder / "fifo.json" in scanned
            # bytes as stored count, not characters: 'é' is two bytes
            srv.service.registry.table_bytes = len(_table_text(artifact, "big").encode()) + 100
            with pytest.raises(InvalidArgument, match="must be at most .* bytes"):
                c.register_target(_table_text(artifact, "big", pad="é" * 90))
            srv.service.registry.table_bytes = 1 << 20
            for name in ("b", "c"):
                c.register_target(_table_text(artifact, name))
            with pytest.raises(ResourceExhausted, match="3 registered targets, the most this server keeps"):
                c.register_target(_table_text(artifact, "d"))
            c.register_target(_table_text(artifact, "c"), replace=True)  # replacing one is always allowed
    finally:
        srv.stop(0)


def test_a_full_disk_answers_resource_exhausted_and_leaves_no_temp_file(artifact, tmp_path, monkeypatch):
    targets = tmp_path / "targets"
    srv = Server(Registry([str(artifact)], str(targets)), ServeConfig(port=0)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            c.register_target(_table_text(artifact, "first"))
            folder = next(targets.iterdir())

            def full(fd):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(_io.os, "fsync", full)  # the write itself fails as on a full disk
            with pytest.raises(ResourceExhausted, match="No space left on device .full.; nothing was stored"):
                c.register_target(_table_text(artifact, "second"))
            monkeypatch.undo()
            assert sorted(p.name for p in folder.iterdir()) == ["first.json"]  # no temp file left behind
            assert c.register_target(_table_text(artifact, "second"))["name"] == "second"
    finally:
        srv.stop(0)


def test_an_acknowledged_registration_survives_kill_9(artifact, tmp_path):
    targets = tmp_path / "targets"

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "ofa", "serve", "--artifact", str(artifact), "--port", "0",
                                 "--targets-dir", str(targets), "--max-searches", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, line
        return proc, f"127.0.0.1:{int(line.split('127.0.0.1:')[1].split()[0])}"

    proc, address = start()
    try:
        with Client(address) as c:
            c.register_target(_table_text(artifact, "kept"))
        proc.kill()  # right after the acknowledgement
        proc.wait(30)
        assert not [p for p in targets.rglob("*") if p.name.endswith((".tmp", ".part"))]
        proc, address = start()
        with Client(address) as c:
            assert "kept" in [t["name"] for t in c.targets()]
            assert c.search("kept", max_latency_ms=1e5, generations=5).id
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def owned(artifact, tmp_path_factory):
    """(server, targets folder, alice's token): clients alice and bob, and a target "owned" that alice registered."""
    targets, token_file = tmp_path_factory.mktemp("owned") / "targets", tmp_path_factory.mktemp("tokens") / "t"
    token_file.write_text("# two clients\nalice s3cret\nbob other-s3cret\n")
    tokens = Tokens.from_file(token_file)
    srv = Server(Registry([str(artifact)], str(targets)), ServeConfig(port=0), tokens=tokens).start()
    with Client(f"127.0.0.1:{srv.port}", token="s3cret") as alice:
        alice.register_target(_table_text(artifact, "owned"))
    yield srv, targets, "s3cret"
    srv.stop(0)


def _as(srv, who: str) -> Client:
    return Client(f"127.0.0.1:{srv.port}", token={"alice": "s3cret", "bob": "other-s3cret", "anonymous": None}[who])


REFUSALS = [  # (who, what they try, error, message)
    pytest.param("anonymous", lambda c, a: c.delete_target("owned"), Unauthenticated, "bearer token",
                 id="no-token"),
    # a target is its registering client's: another token may neither replace nor delete it
    pytest.param("bob", lambda c, a: c.register_target(_table_text(a, "owned"), replace=True), PermissionDenied,
                 "registered by client 'alice'; only that client's token", id="another-client-replaces"),
    pytest.param("bob", lambda c, a: c.delete_target("owned"), PermissionDenied, "may delete it",
                 id="another-client-deletes"),
    pytest.param("alice", lambda c, a: c.delete_target("never-registered"), NotFound,
                 "no registered target 'never-registered'", id="unknown-target"),
    pytest.param("alice", lambda c, a: c.delete_target(TARGET), Infeasible,
                 "ships with the supernet and cannot be removed", id="artifact-target"),
]


@pytest.mark.parametrize("who, attempt, error, message", REFUSALS)
def test_a_delete_or_replace_that_is_not_allowed_is_refused(owned, artifact, who, attempt, error, message):
    srv, targets, _ = owned
    with _as(srv, who) as c, pytest.raises(error, match=message):
        attempt(c, artifact)
    assert list(targets.rglob("owned.json"))  # still there


def test_another_client_may_search_a_target_it_does_not_own(owned):
    with _as(owned[0], "bob") as bob:
        assert bob.search("owned", max_latency_ms=1e5, generations=5).id


def test_the_owner_replaces_and_deletes_its_target(owned, artifact):
    srv, targets, _ = owned
    with _as(srv, "alice") as c:
        c.register_target(_table_text(artifact, "gone-soon"))
        c.register_target(_table_text(artifact, "gone-soon"), replace=True)
        assert c.delete_target("gone-soon") == "gone-soon"
        assert not list(targets.rglob("gone-soon.json"))
        assert "gone-soon" not in [t["name"] for t in c.targets()]
        with pytest.raises(NotFound):
            c.search("gone-soon", max_latency_ms=10)


def test_the_cli_deletes_a_target_with_a_token_file(owned, artifact, tmp_path):
    srv, targets, token = owned
    with _as(srv, "alice") as c:
        c.register_target(_table_text(artifact, "by-cli"))
    mine = tmp_path / "token"
    mine.write_text(token)
    assert client_main(["--address", f"127.0.0.1:{srv.port}", "--token-file", str(mine), "delete", "by-cli"]) == 0
    assert not list(targets.rglob("by-cli.json"))


def _reader_channels(address: str, n: int) -> list:
    """``n`` channels, a connection each (as separate clients have), with a small flow-control window: the
    server blocks on a chunk such a client does not read."""
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384),
               ("grpc.use_local_subchannel_pool", 1)]
    return [grpc.insecure_channel(address, options) for _ in range(n)]


def test_clients_that_stop_reading_cannot_take_every_thread(artifact):
    srv = Server(Registry([str(artifact)], None), ServeConfig(
        port=0, workers=2, max_searches=1, max_streams=2, max_health_watches=3, stream_stall_s=6.0,
        stream_preempt_s=600.0, max_streams_per_peer=3)).start()  # (one client here: 127.0.0.1)
    address = f"127.0.0.1:{srv.port}"
    channels = _reader_channels(address, 3)
    try:
        with Client(address) as c:
            best = c.search(generations=5)
            assert len(c.fetch(best, "safetensors").data) > 1 << 18  # larger than any window in play
            request = pb.GetSubnetWeightsRequest(subnet_id=best.id, format=pb.WEIGHTS_FORMAT_SAFETENSORS)
            slow = [pb_grpc.SubnetServiceStub(ch).GetSubnetWeights(request, timeout=60) for ch in channels[:2]]
            assert all(next(s).HasField("header") for s in slow)  # then they read nothing more
            with pytest.raises(grpc.RpcError) as e:
                list(pb_grpc.SubnetServiceStub(channels[2]).GetSubnetWeights(request, timeout=30))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams)" in e.value.details()
            # health watches hold threads too (as many as allowed): still every other RPC has its own
            watches = []
            for _ in range(3):  # one by one: calls waiting for their requests together are bounded per connection
                watches.append(health_pb2_grpc.HealthStub(channels[2]).Watch(health_pb2.HealthCheckRequest()))
                assert next(watches[-1]).status == health_pb2.HealthCheckResponse.SERVING
            t0 = time.monotonic()
            assert c.health() == "SERVING" and c.targets() and c.search(generations=5, seed=1).id
            assert time.monotonic() - t0 < 30  # other RPCs still have threads
            for w in watches:
                w.cancel()
            # the server cancels streams whose client took nothing for stream_stall_s: their threads are free
            until(lambda: srv.service.streams_open == 0, 60, "the stalled streams cancelled")
            for s in slow:
                with pytest.raises(grpc.RpcError) as e:
                    list(s)
                assert e.value.code() == grpc.StatusCode.CANCELLED
            assert c.fetch(best, "safetensors").sha256
    finally:
        for ch in channels:
            ch.close()
        srv.stop(0)


def test_a_stalled_stream_makes_way_and_one_connection_holds_few(artifact):
    """All stream slots taken by clients that stopped reading: a new stream cancels the one stalled longest
    (past --stream-preempt-s) and is sent; one client cannot open more than --max-streams-per-peer (a client
    is an address here: the per-client bound is checked first with 1, then lifted to 3)."""
    srv = Server(Registry([str(artifact)], None), ServeConfig(port=0, max_searches=1, max_streams=2,
                                                               max_streams_per_peer=1, stream_preempt_s=1.0)).start()
    address = f"127.0.0.1:{srv.port}"
    channels = _reader_channels(address, 2)
    try:
        with Client(address) as c:
            best = c.search(generations=5)
            c.fetch(best, "safetensors")
            request = pb.GetSubnetWeightsRequest(subnet_id=best.id, format=pb.WEIGHTS_FORMAT_SAFETENSORS)
            stubs = [pb_grpc.SubnetServiceStub(ch) for ch in channels]
            first = stubs[0].GetSubnetWeights(request, timeout=60)
            assert next(first).HasField("header")
            with pytest.raises(grpc.RpcError) as e:  # a second on the same connection
                list(stubs[0].GetSubnetWeights(request, timeout=30))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams-per-peer" in e.value.details()
            srv.service.streams.slots.per_peer = 3  # from here on the server-wide bound (2) is the one met
            second = stubs[1].GetSubnetWeights(request, timeout=60)
            assert next(second).HasField("header")
            time.sleep(1.5)  # both stalled past stream_preempt_s
            assert c.fetch(best, "safetensors").sha256  # made way: the stream stalled longest was cancelled
            with pytest.raises(grpc.RpcError) as e:
                list(first)
            assert e.value.code() == grpc.StatusCode.CANCELLED
            second.cancel()
    finally:
        for ch in channels:
            ch.close()
        srv.stop(0)
