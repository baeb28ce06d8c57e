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
