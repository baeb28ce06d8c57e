"""The client as its own distribution: `pip install ./client` into a fresh virtual environment (no torch),
used against a real server; the wheel's contents; the API version handshake."""
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from conftest import ROOT, served_copy
from ofa_client import API_VERSION, Client, VersionMismatch
from ofa_client.cli import main as client_main
from ofa_client.v1 import subnet_service_pb2 as pb
from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc
from ofa_server.main import ServeConfig, Server
from ofa_server.registry import Registry

TARGET = "synthetic-cpu"
SITE_PACKAGES_LIMIT = 60 << 20


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    art = served_copy(tiny_artifact, tmp_path_factory.mktemp("served") / "tiny", TARGET)
    srv = Server(Registry([str(art)]), ServeConfig(port=0, max_searches=2)).start()
    yield srv
    srv.stop(0)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def test_pip_install_of_the_client_alone_searches_fetches_and_runs_the_cli(server, tmp_path):
    """What the README says a pipeline does: a fresh venv, `pip install ./client` from the repository root."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "./client"], cwd=ROOT,
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    installed = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], check=True,
                               capture_output=True, text=True).stdout
    names = {d["name"].lower() for d in json.loads(installed)}
    assert "torch" not in names and "numpy" not in names and {"ofa-client", "grpcio", "protobuf"} <= names
    assert _size(site) < SITE_PACKAGES_LIMIT, f"{site}: {_size(site) / 2**20:.1f} MiB"
    address = f"127.0.0.1:{server.port}"
    script = f"""
import hashlib, importlib.util, json
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("ofa") is None
import ofa_client
from ofa_client import Client
assert ofa_client.__file__.startswith({str(site)!r}), ofa_client.__file__  # the installed copy, not the checkout
with Client("{address}") as c:
    best = c.search("{TARGET}", max_latency_ms=3.0)
    w = c.fetch(best, "onnx")
    assert hashlib.sha256(w.data).hexdigest() == w.sha256
    print(json.dumps({{"id": best.id, "arch": best.arch, "sha256": w.sha256, "server": c.server_api_version}}))
"""
    run = subprocess.run([str(py), "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert found["server"] == API_VERSION and len(found["id"]) == 16
    # the installed CLI: the same search as JSON, then fetch its result to a file
    cli = venv / "bin" / "ofa-client"
    out = subprocess.run([str(cli), "--address", address, "--json", "search", "--target", TARGET,
                          "--max-latency-ms", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == found["id"]
    (tmp_path / "best.json").write_text(out.stdout)
    fetched = subprocess.run([str(cli), "--address", address, "--json", "fetch", "--arch", "@best.json",
                              "--format", "onnx", "--out", "m.onnx"], cwd=tmp_path, capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr
    assert hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest() == found["sha256"]
    infeasible = subprocess.run([str(cli), "--address", address, "search", "--max-macs", "10"],
                                cwd=tmp_path, capture_output=True, text=True)
    assert infeasible.returncode == 3 and "below the smallest achievable" in infeasible.stderr


def test_the_wheel_holds_the_client_and_its_generated_modules_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), "./client"], cwd=ROOT, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ofa_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"ofa_client", wheel.name.split("-py3")[0] + ".dist-info"}
    assert {"ofa_client/client.py", "ofa_client/cli.py", "ofa_client/py.typed", "ofa_client/v1/__init__.py",
            "ofa_client/v1/subnet_service_pb2.py", "ofa_client/v1/subnet_service_pb2_grpc.py"} <= set(names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.split()[1].split(">")[0].split("<")[0] for r in requires) == ["grpcio", "protobuf"]
    assert wheel.name.endswith("-py3-none-any.whl")  # pure Python: one wheel for every platform


class _VersionServer:
    """A SubnetService on 127.0.0.1 that reports ``version`` and counts the searches it is sent."""

    def __init__(self, version: str):
        self.searches = 0
        outer = self

        class Servicer(pb_grpc.SubnetServiceServicer):
            def ListSupernets(self, request, context):
                return pb.ListSupernetsResponse(api_version=version)

            def SearchSubnet(self, request, context):
                outer.searches += 1
                return pb.Subnet(id="0" * 16, supernet="x")

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        pb_grpc.add_SubnetServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stop(0)


@pytest.mark.parametrize("version, message", [
    ("2.0", f"speaks API 2.0; this ofa-client speaks {API_VERSION} and needs a server of API 1.0 or a later 1.x"),
    ("0.9", f"speaks API 0.9; this ofa-client speaks {API_VERSION}"),
    ("banana" * 20, "reports API version 'bananabanana"),
])
def test_a_server_of_another_api_version_is_refused_before_the_first_call(version, message, capsys):
    with _VersionServer(version) as srv:
        with Client(f"127.0.0.1:{srv.port}") as c:
            with pytest.raises(VersionMismatch, match=re.escape(message)) as e:
                c.search()
            assert c.server_api_version is None and len(str(e.value)) < 400  # unbounded input not echoed
        assert srv.searches == 0  # nothing was sent that the server might have misread
        assert client_main(["--address", f"127.0.0.1:{srv.port}", "search"]) == 8
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("version", ["1.0", "1.7", ""])  # a newer minor adds only; "" is a server before the field
def test_a_compatible_server_is_asked_once(version):
    with _VersionServer(version) as srv, Client(f"127.0.0.1:{srv.port}") as c:
        c.search()
        c.search()
        assert srv.searches == 2 and c.server_api_version == (version or "1.0")


def test_the_real_server_reports_the_version_the_proto_states(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        c.supernets()
        assert c.server_api_version == API_VERSION
    proto = (ROOT / "proto" / "ofa" / "v1" / "subnet_service.proto").read_text()
    assert f"// API version {API_VERSION}." in proto


@pytest.mark.parametrize("rows, message", [
    ([{"subnet_id": "a" * 16, "ms": 1.0, "pass_index": -1}], r"reference_timings\[0\] must be .*\"pass_index\""),
    ([{"subnet_id": "a" * 16, "ms": 1.0, "pass_index": 1.5}], r"reference_timings\[0\] must be"),
    ([{"subnet_id": "a" * 16, "ms": 1.0, "pass_index": True}], r"reference_timings\[0\] must be"),
], ids=["negative", "fraction", "bool"])
def test_a_bad_pass_index_is_refused_before_it_is_sent(rows, message):
    from ofa_client.values import reference_timings_of

    with pytest.raises(ValueError, match=message):
        reference_timings_of(rows)
    sent = reference_timings_of([{"subnet_id": "a" * 16, "ms": 1.0, "pass_index": 2}, {"subnet_id": "a" * 16, "ms": 2.0}])
    assert [(t.pass_index, t.ms) for t in sent] == [(2, 1.0), (0, 2.0)]


@pytest.mark.parametrize("flags, message", [
    (["--timeout", "0"], r"--timeout must be seconds in \(0, 1e6\], got '0.0'"),
    (["--timeout", "nan"], "--timeout must be seconds"),
    (["--timeout", "inf"], "--timeout must be seconds"),
    (["--address", ""], "--address must be HOST:PORT"),
    (["--address", "127.0.0.1:99999"], "--address must be HOST:PORT"),  # grpc dialled port 34463
    (["--address", "ipv4:garbage,x"], "--address must be HOST:PORT"),
    (["--address", "http://127.0.0.1:1"], "--address must be HOST:PORT"),
    (["--ca-cert", ""], "--ca-cert must be True, False or the path"),  # was plaintext: a token sent in clear
], ids=["timeout-0", "timeout-nan", "timeout-inf", "address-empty", "address-port", "address-garbage",
        "address-url", "ca-cert-empty"])
def test_connection_flags_that_would_fail_every_call_are_refused_first(flags, message, capsys):
    assert client_main([*flags, "health"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_certificate_or_token_no_connection_can_use_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.pem").write_text("not a certificate")
    assert client_main(["--ca-cert", str(tmp_path / "bad.pem"), "health"]) == 2
    assert "holds no PEM certificate" in capsys.readouterr().err
    for token in ("secret\nsecond", "sécret"):  # no HTTP header can carry them: grpc failed with INTERNAL
        (tmp_path / "tok").write_text(token)
        assert client_main(["--token-file", str(tmp_path / "tok"), "health"]) == 2
        assert "the token (--token-file, or $OFA_TOKEN) must be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="timeout must be seconds"):
        Client("127.0.0.1:1", timeout=-1)


def test_fetch_is_retried_whole_when_unavailable_and_saved_as_any_new_file(server, tmp_path, capsys, monkeypatch):
    """A weights stream cut by UNAVAILABLE (a replica going down) is fetched again, as the docstring says; the file
    gets the mode the umask gives a new file (mkstemp's 0600 kept a pipeline's other users out)."""
    import os
    import stat

    with Client(f"127.0.0.1:{server.port}") as c:
        best = c.search(TARGET, max_latency_ms=3.0)
        download, calls = c._download, []

        def cut_once(*args):
            calls.append(1)
            if len(calls) == 1:
                from ofa_client import Unavailable

                raise Unavailable("UNAVAILABLE", "replica going down")
            return download(*args)

        monkeypatch.setattr(c, "_download", cut_once)
        w = c.fetch(best, "onnx")
        assert len(calls) == 2 and w.sha256
        old = os.umask(0o022)
        try:
            w.save(tmp_path / "m.onnx")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o644
    address = ["--address", f"127.0.0.1:{server.port}"]
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert client_main([*address, "fetch", "--arch", f"@{tmp_path / 'deep.json'}", "--out", "x"]) == 2
    assert "--arch" in (err := capsys.readouterr().err) and "nests too deeply" in err
    (tmp_path / "empty.json").write_text("")
    assert client_main([*address, "fetch", "--arch", f"@{tmp_path / 'empty.json'}", "--out", "x"]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert client_main([*address, "fetch", "--id", best.id, "--out", str(tmp_path / "nodir" / "m.st")]) == 2
    assert "--out must be a file in an existing folder" in capsys.readouterr().err  # before the download
    assert client_main([*address, "fetch", "--arch", f"@{'x' * 100_000}", "--out", "x"]) == 2
    assert len(capsys.readouterr().err) < 1200  # a path given is said, not echoed whole


def test_a_number_no_request_field_can_hold_is_named_before_sending(capsys):
    c = Client("127.0.0.1:1")  # nothing listens: these are refused before any call
    for call, message in ((lambda: c.search(seed=-1), "seed must be an integer in 0.."),
                          (lambda: c.search(max_macs=2**70), "max_macs must be an integer"),
                          (lambda: c.pareto(points=2**40), "points must be an integer")):
        with pytest.raises(ValueError, match=message):  # protobuf's own said "Value out of range: -1"
            call()
    assert client_main(["--address", "127.0.0.1:1", "search", "--max-macs", str(10**23)]) == 2
    assert "--max-macs must be an integer in 0.." in capsys.readouterr().err
