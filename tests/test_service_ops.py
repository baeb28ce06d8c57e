"""What an operator sees: Prometheus metrics on --metrics-port, one access-log line per call, JSON logs."""
import json
import logging
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import served_copy
from ofa_client import Client, InvalidArgument, ResourceExhausted
from ofa_server.main import ServeConfig, Server
from ofa_server.metrics import JsonFormatter
from ofa_server.registry import Registry

TARGET = "synthetic-cpu"


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    art = served_copy(tiny_artifact, tmp_path_factory.mktemp("served") / "tiny", TARGET)
    srv = Server(Registry([str(art)]), ServeConfig(port=0, max_searches=2, metrics_port=0)).start()
    yield srv
    srv.stop(0)


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_calls_by_rpc_and_code_and_show_the_service(server, caplog):
    with caplog.at_level(logging.INFO, logger="ofa_server.access"), \
            Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        best = client.search(target=TARGET, seed=3)
        client.fetch(best, "safetensors")
        client.fetch(best, "safetensors")  # the second from the cache
        with pytest.raises(InvalidArgument):
            client.search(target=TARGET, max_latency_ms=-1)
        slots = server.service.search_slots  # both search slots taken: the next search is refused
        assert slots.acquire("peer-a") is None and slots.acquire("peer-b") is None
        try:
            with pytest.raises(ResourceExhausted, match="limit of 2 concurrent searches"):
                client.search(target=TARGET)
        finally:
            slots.release("peer-a")
            slots.release("peer-b")
    m = _scrape(server.metrics_port)
    calls = lambda rpc, code: m.get(("ofa_rpc_calls_total", (("code", code), ("rpc", rpc))), 0)
    assert calls("SearchSubnet", "OK") == 1 and calls("SearchSubnet", "INVALID_ARGUMENT") == 1
    assert calls("GetSubnetWeights", "OK") == 2
    assert calls("SearchSubnet", "RESOURCE_EXHAUSTED") == 1
    assert m[("ofa_rpc_seconds_count", (("rpc", "SearchSubnet"),))] == 3
    assert m[("ofa_weight_cache_misses_total", ())] == 1 and m[("ofa_weight_cache_hits_total", ())] >= 1
    assert m[("ofa_weight_cache_bytes", ())] > 0 and m[("ofa_search_workers_alive", ())] == 2
    assert m[("ofa_searches_in_flight", ())] == 0 and m[("ofa_registered_targets", ())] == 0
    assert m[("ofa_searches_refused_total", ())] == 1
    # one access line per call, with what a JSON log carries
    lines = [r for r in caplog.records if r.name == "ofa_server.access"]
    assert [(r.rpc, r.code) for r in lines if r.rpc != "Check"] == [
        ("ListSupernets", "OK"),  # the client's API version check, once
        ("SearchSubnet", "OK"), ("GetSubnetWeights", "OK"), ("GetSubnetWeights", "OK"),
        ("SearchSubnet", "INVALID_ARGUMENT"), ("SearchSubnet", "RESOURCE_EXHAUSTED")]
    record = json.loads(JsonFormatter().format(lines[0]))
    assert set(record) >= {"time", "level", "rpc", "code", "ms", "peer", "message"} and record["code"] == "OK"


def test_a_taken_metrics_port_is_refused_with_the_flag(tiny_artifact, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        art = served_copy(tiny_artifact, tmp_path / "tiny", TARGET)
        with pytest.raises(OSError, match=f"--metrics-port {port} on 127.0.0.1: Address already in use"):
            Server(Registry([str(art)]), ServeConfig(port=0, metrics_port=port))


def test_a_port_another_server_holds_is_refused_not_shared(tiny_artifact, tmp_path):
    """grpc sets SO_REUSEPORT by default: a second server on a taken port listened beside the first, and the
    kernel split the connections between the two."""
    art = served_copy(tiny_artifact, tmp_path / "tiny", TARGET)
    first = Server(Registry([str(art)]), ServeConfig(port=0)).start()
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.port}: is --port {first.port} in use"):
            Server(Registry([str(art)]), ServeConfig(port=first.port))
    finally:
        first.stop(0)


def test_bad_operations_flags_are_refused():
    with pytest.raises(ValueError, match="--metrics-port must be in 0..65535, got 70000"):
        ServeConfig(metrics_port=70000)
    for change, message in (({"port": 99999}, "--port must be in 0..65535"), ({"port": -1}, "--port must be"),
                            ({"max_connection_age_s": float("inf")}, r"--max-connection-age-s must be in \[1, 1e9\]"),
                            ({"grace": float("nan")}, r"--grace must be seconds in \[0, 3600\]"),
                            ({"threads": -1}, "--threads must be in 0..1024"),
                            ({"search_niceness": 20}, r"--search-niceness must be an integer in 0\.\.19, got 20"),
                            ({"search_niceness": -1}, "--search-niceness must be")):
        with pytest.raises(ValueError, match=message):
            ServeConfig(**change)
    with pytest.raises(ValueError, match=r"--log-format must be one of \['text', 'json'\], got 'xml'"):
        ServeConfig(log_format="xml")
    with pytest.raises(ValueError, match="--port-file must be in a folder that exists, got '/nowhere/p.json'"):
        ServeConfig(port_file="/nowhere/p.json")  # refused before serving, not after health said SERVING


def test_the_json_log_is_one_object_a_line():
    rec = logging.LogRecord("ofa_server", logging.WARNING, __file__, 1, "a %s\nof two lines", ("message",), None)
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    out = json.loads(line)
    assert (out["level"], out["logger"], out["message"]) == ("WARNING", "ofa_server", "a message\nof two lines")
    assert out["time"][:2] == "20" and "rpc" not in out


def test_a_registration_waiting_on_a_slow_disk_holds_up_no_search(tiny_artifact, tmp_path, monkeypatch):
    # a busy shared disk: the registration's fsync takes as long as it takes; searches, listings and even another
    # registration's checks go on meanwhile (the write lock is not the lock each search's scan of the folder takes)
    import threading

    from conftest import synthetic_table
    from ofa import _io
    from ofa.artifact import load_artifact

    art = served_copy(tiny_artifact, tmp_path / "tiny", TARGET)
    space = load_artifact(art).space
    srv = Server(Registry([str(art)], str(tmp_path / "targets")), ServeConfig(port=0, max_searches=1)).start()
    release, entered, real_fsync = threading.Event(), threading.Event(), _io.os.fsync

    def slow_fsync(fd):
        entered.set()
        release.wait(120)
        real_fsync(fd)

    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.register_target(json.dumps(synthetic_table(space, "phone-a")))
            monkeypatch.setattr(_io.os, "fsync", slow_fsync)
            done = {}
            t = threading.Thread(target=lambda: done.update(r=c.register_target(
                json.dumps(synthetic_table(space, "phone-b", seed=2)))))
            t.start()
            assert entered.wait(60)  # the second registration is writing, and waits on the disk
            assert c.search(target="phone-a", seed=1).id and "phone-a" in [x["name"] for x in c.targets()]
            assert not done  # it is still waiting: the answers above did not wait for it
            release.set()
            t.join(120)
            assert done["r"]["name"] == "phone-b" and c.search(target="phone-b").id
    finally:
        release.set()
        srv.stop(0)
