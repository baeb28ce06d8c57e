"""The profiling kit: a device becomes a target with only the light client (``ofa-client profile``, no torch)."""
import importlib.util
import json
import shutil
import tarfile
import subprocess
import sys

import numpy as np
import pytest
from conftest import served_copy

from ofa.artifact import load_artifact
from ofa.cli import main as ofa_main
from ofa.predict.latency import LatencyPredictor, block_plan, validate_table
from ofa.space import get_space
from ofa_client import Client, Infeasible, InvalidArgument
from ofa_client.cli import main as client_main
from ofa_client.profile import KitError, _features, profile_kit, read_kit
from ofa_server.args import ServeConfig
from ofa_server.main import Server
from ofa_server.registry import Registry

FAST = ["--rounds", "2", "--sample-ms", "1", "--warmup-ms", "1"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A served artifact of the small test space (38 blocks; untrained: a kit's files and timings are the
    space's, not the weights'), so that each kit here is a few dozen networks to export and time."""
    from test_latency import _tiny_artifact

    root = tmp_path_factory.mktemp("kit")
    return served_copy(_tiny_artifact(root / "untrained"), root / "tiny")


@pytest.fixture(scope="module")
def kit(artifact, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kit") / "kit"
    assert ofa_main(["profile", "--kit", str(folder), "--artifact", str(artifact), "--subnets", "12",
                     "--references", "4", "--held-out", "0.25", "--no-progress"]) == 0
    return folder


def test_the_kit_names_every_block_and_its_recipes_are_the_servers_features(kit, artifact):
    manifest = read_kit(kit)  # every sha256 checked
    assert sorted(p.name for p in (kit / "nets").iterdir()) == sorted(  # the networks and nothing else
        f["file"].split("/")[-1] for f in manifest["entries"] + manifest["subnets"])
    space = load_artifact(artifact).space
    entries, _, _ = block_plan(space)
    assert sorted(e["key"] for e in manifest["entries"]) == sorted(entries)
    assert manifest["space"] == json.loads(space.to_json()) and manifest["opset"] == 17
    roles = [s["role"] for s in manifest["subnets"]]
    assert roles.count("reference") == 4 and roles.count("held_out") == 3 and roles.count("fit") == 9
    # the device's features from the recipes equal the server's from the table, for any block times
    table = json.loads((artifact / "latency" / "synthetic-cpu.json").read_text())
    table["entries"] = {k: float(v) for k, v in zip(sorted(entries), np.random.default_rng(3).uniform(
        0.01, 1.0, len(entries)))}
    archs = [space.arch_from_json(json.dumps(s["arch"])) for s in manifest["subnets"]]
    want = LatencyPredictor(space, table).features(space.encode(archs))
    assert np.allclose(_features(manifest, table["entries"]), want)


def test_openvino_times_the_same_kit(kit, artifact):
    """The second runtime: the kit's ONNX files compiled by OpenVINO (each reshaped to its static input)."""
    pytest.importorskip("openvino")
    table = profile_kit(kit, "kit-openvino", runtime="openvino", rounds=2, sample_ms=1.0, warmup_ms=2.0)
    validate_table(table, load_artifact(artifact).space)
    assert table["device"]["backend"] == "openvino" and table["device"]["backend_version"]
    assert all(v > 0 for v in table["entries"].values())


def test_a_changed_or_foreign_kit_is_refused(kit, tmp_path):
    copy = tmp_path / "kit"
    shutil.copytree(kit, copy)
    first = json.loads((copy / "kit.json").read_text())["subnets"][0]["file"]
    (copy / first).write_bytes((copy / first).read_bytes()[:-1] + b"x")
    with pytest.raises(KitError, match="does not match its sha256"):
        read_kit(copy)
    (copy / "kit.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(KitError, match="not a 'ofa-profile-kit' version 1 kit"):
        read_kit(copy)
    for entries in ({}, 5, [{"file": 1}]):  # a KeyError or TypeError before
        (copy / "kit.json").write_text(json.dumps({"format": "ofa-profile-kit", "version": 1, "entries": entries}))
        with pytest.raises(KitError, match="kit.json's entries must be a list"):
            read_kit(copy)
    with pytest.raises(ValueError, match=r"provider must be one of \['.*CPUExecutionProvider'\]"):
        profile_kit(kit, "x", provider="NoSuchExecutionProvider")
    with pytest.raises(ValueError, match="runtime must be one of"):
        profile_kit(kit, "x", runtime="tflite")


def test_the_light_client_profiles_registers_and_the_target_serves(kit, artifact, tmp_path, capsys):
    table = profile_kit(kit, "kit-device", rounds=2, sample_ms=1.0, warmup_ms=2.0)
    space = load_artifact(artifact).space
    validate_table(table, space)  # the server's own check passes: the format, every block, the model
    assert table["fit"]["held_out"] == 3 and table["fit"]["quality"]["held_out"]["subnets"] == 3
    assert len(table["references"]) == 4 and table["device"]["backend"] == "onnxruntime"
    srv = Server(Registry([str(artifact)], str(tmp_path / "targets")), ServeConfig(port=0, max_searches=1)).start()
    try:
        address = ["--address", f"127.0.0.1:{srv.port}", "--json"]
        out = tmp_path / "table.json"
        assert client_main([*address, "profile", "--kit", str(kit), "--target", "my-device", "--out", str(out),
                            *FAST]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["registered"] == "my-device" and summary["blocks"] == len(table["entries"])
        assert json.loads(out.read_text())["target"] == "my-device"
        with Client(f"127.0.0.1:{srv.port}") as c:
            assert "my-device" in {t["name"] for t in c.targets()}
            best = c.search("my-device", max_latency_ms=1e3)
            assert best.predicted_latency_ms > 0 and c.fetch(best, "onnx").sha256
    finally:
        srv.stop()


def test_a_kit_of_another_space_is_refused_before_timing(kit, artifact, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(kit, other)
    manifest = json.loads((other / "kit.json").read_text())
    manifest["space"] = json.loads(get_space("mbv3-imagenet").to_json())
    (other / "kit.json").write_text(json.dumps(manifest))
    srv = Server(Registry([str(artifact)], None), ServeConfig(port=0, max_searches=1)).start()
    try:
        code = client_main(["--address", f"127.0.0.1:{srv.port}", "profile", "--kit", str(other), "--target", "x",
                            *FAST])
        assert code == 2 and "the kit is of space 'mbv3-imagenet'" in capsys.readouterr().err
        # a name no table may carry, and a file no folder holds: refused before minutes of timing, not after
        for flags, message in ((["--target", "bad name!"], "--target must be 1-64 characters"),
                               (["--target", "x", "--out", str(tmp_path / "nodir" / "t.json")],
                                "--out must be a file in an existing folder")):
            assert client_main(["--address", f"127.0.0.1:{srv.port}", "profile", "--kit", str(kit), *flags,
                                *FAST]) == 2
            assert message in capsys.readouterr().err
    finally:
        srv.stop()


def test_the_profile_needs_no_torch(kit, tmp_path):
    """``ofa-client profile`` with torch and the ofa package made unimportable: it still times and writes."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'ofa', 'ofa_server'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from ofa_client.cli import main\n"
            f"code = main(['profile', '--kit', {str(kit)!r}, '--target', 'd', '--no-register', '--out', "
            f"{str(tmp_path / 't.json')!r}, '--rounds', '2', '--sample-ms', '1'])\n"
            "assert 'torch' not in sys.modules\n"
            "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "t.json").read_text())["fit"]["held_out"] == 3


def test_an_int8_kit_is_quantized_for_its_runtime_and_another_runtime_is_refused(tmp_path):
    """An int8 kit stands for one runtime's served int8 file (here openvino_int8: NNCF's quantizer): a device
    timing it in another runtime would time networks it will never run."""
    pytest.importorskip("nncf")
    import dataclasses

    import onnx
    from test_latency import TINY

    from ofa.predict.latency import table_format

    space = dataclasses.replace(TINY, resolutions=(12,), kernel_choices=(3,))  # few blocks: NNCF is slow
    (tmp_path / "space.json").write_text(space.to_json())
    kit = tmp_path / "kit"
    assert ofa_main(["profile", "--kit", str(kit), "--space-file", str(tmp_path / "space.json"), "--precision", "int8",
                     "--backend", "openvino", "--subnets", "6", "--references", "2", "--no-progress"]) == 0
    manifest = read_kit(kit)
    assert (manifest["precision"], manifest["weights_format"], manifest["runtimes"]) == ("int8", "openvino_int8",
                                                                                         ["openvino"])
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(kit / manifest["subnets"][0]["file"]).graph.node)
    with pytest.raises(KitError, match=r"run by \['openvino'\] only, not onnxruntime"):
        profile_kit(kit, "x", runtime="onnxruntime")
    # a kit from a server before API 1.5 names no runtimes: its int8 networks are onnxruntime's quantizer's
    old = tmp_path / "old-kit"
    shutil.copytree(kit, old)
    (old / "kit.json").write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("runtimes",
                                                                                             "weights_format")}))
    with pytest.raises(KitError, match=r"run by \['onnxruntime'\] only, not openvino"):
        profile_kit(old, "x", runtime="openvino")
    table = profile_kit(kit, "ov-int8", runtime="openvino", rounds=2, sample_ms=1.0, warmup_ms=2.0)
    validate_table(table, space)
    assert table["device"]["precision"] == "int8" and table_format(table) == "openvino_int8"


def test_the_server_hands_out_its_kit_and_a_device_registers_from_it(artifact, tmp_path, capsys, monkeypatch):
    """GetProfileKit (API 1.4): built on the first request, verified by sha256 and unpacked by the client;
    ``ofa-client profile`` without --kit fetches it, times it and registers the target. A build that meets a
    full disk is RESOURCE_EXHAUSTED, keeps nothing half-built, and is built on the retry."""
    import errno
    import functools

    from ofa_client import ResourceExhausted
    from ofa_server import kits

    small = functools.partial(kits.write_kit, subnets=12, references=4)  # 16 subnets, not 90: the same code
    monkeypatch.setattr(kits, "write_kit", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    srv = Server(Registry([str(artifact)], str(tmp_path / "targets")), ServeConfig(port=0, max_searches=1)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=600) as c:
            with pytest.raises(ResourceExhausted, match="disk is full; retry later"):
                c.fetch_kit(tmp_path / "full")
            monkeypatch.setattr(kits, "write_kit", small)  # space again
            folder = c.fetch_kit(tmp_path / "kit")
            kit = read_kit(folder)  # every file's sha256 checked again
            assert kit["space"] == json.loads(load_artifact(artifact).space.to_json()) and kit["precision"] == "fp32"
            assert len(kit["subnets"]) == 16
            with pytest.raises(InvalidArgument, match=r"precision must be one of \['fp32', 'int8'\]"):
                c.fetch_kit(tmp_path / "other", precision="int4")
            with pytest.raises(InvalidArgument, match=r"runtime must be one of \['onnxruntime', 'openvino'\]"):
                c.fetch_kit(tmp_path / "other", precision="int8", runtime="tflite")
            # an fp32 kit is one for every ONNX runtime: asked for OpenVINO, the same bytes, from the cache
            assert read_kit(c.fetch_kit(tmp_path / "ov", runtime="openvino")) == kit
        address = ["--address", f"127.0.0.1:{srv.port}", "--json"]
        assert client_main([*address, "profile", "--target", "from-server", *FAST]) == 0
        assert json.loads(capsys.readouterr().out)["registered"] == "from-server"
        with pytest.raises(SystemExit):  # argparse names the choices
            client_main([*address, "profile", "--target", "x", "--precision", "int4"])
        capsys.readouterr()
        for flag, value, allowed in (("--rounds", "1", "an integer >= 2"), ("--warmup-ms", "0", "> 0"),
                                     ("--sample-ms", "nan", "> 0"), ("--threads", "0", "an integer >= 1")):
            assert client_main([*address, "profile", "--target", "x", flag, value]) == 2  # before a kit is fetched
            assert f"{flag} must be {allowed}" in capsys.readouterr().err
    finally:
        srv.stop()


def test_a_stopping_server_stops_its_kit_build_and_sweeps_the_folders_of_dead_servers(artifact, tmp_path):
    """A server that stops while a kit builds has the build's export workers killed and its folder removed (it
    used to remove the folder under the running workers, log their FileNotFoundError and wait for them); the build
    ends with ``Closing`` (UNAVAILABLE to a call). The first build of the next server removes the folder a
    ``kill -9``'d server left (its lock file held by nobody) and keeps a live server's, one just made, one without
    a lock file (an older version's server) and a link."""
    import contextlib
    import os
    import threading
    import time

    import grpc

    from ofa_server import kits
    from ofa_server.status import _status

    temp, elsewhere = tmp_path / "tmp", tmp_path / "elsewhere"
    dead, young, older = (temp / f"{kits.PREFIX}{name}" for name in ("dead", "young", "older"))
    for folder in (dead / "abc-onnx" / "nets", young, older, elsewhere):
        folder.mkdir(parents=True)
    (dead / kits.LOCK).touch()
    (temp / f"{kits.PREFIX}link").symlink_to(elsewhere)
    live, held = kits._own_folder(temp)  # a live server's (a second open file description conflicts)
    for folder in (dead, live, older, elsewhere):
        os.utime(folder, (time.time() - 2 * kits.STALE_AFTER_S,) * 2)
    k, ended = kits.Kits(str(temp)), []

    def build() -> None:
        try:
            k.kit(load_artifact(artifact), "onnx", slot=contextlib.nullcontext)
        except Exception as e:  # noqa: BLE001 (the test looks at what it was)
            ended.append(e)

    thread = threading.Thread(target=build)
    thread.start()
    try:
        for _ in range(1200):  # until its workers have exported a network (bounded: 2 minutes)
            if k.folder is not None and any(k.folder.glob("*/nets/*")):
                break
            time.sleep(0.1)
        assert k.folder is not None and any(k.folder.glob("*/nets/*"))
        assert not dead.exists() and all(f.exists() for f in (live, young, older))  # swept as the build began
        assert list(elsewhere.iterdir()) == []  # the link was not followed
    finally:
        k.close()
        thread.join(60)
        os.close(held)
    assert not thread.is_alive() and not k.folder.exists()
    assert len(ended) == 1 and isinstance(ended[0], kits.Closing), ended
    # stopped by the close, not failed by a folder removed under its workers
    assert "workers were stopped" in str(ended[0].__cause__)
    assert _status(ended[0], None, "GetProfileKit")[0] == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(kits.Closing, match="the server is stopping"):  # a build asked for after the close
        k.kit(load_artifact(artifact), "onnx", slot=contextlib.nullcontext)


def test_int8_accuracy_is_measured_and_carried_by_an_int8_targets_answers(tiny_artifact, tmp_path, capsys,
                                                                         monkeypatch):
    """`ofa int8-accuracy`: int8 files of measured subnets tested on their validation images; an int8 target's
    answers add the mean drop and widen the interval by its spread; a fp32 target's stay as they were."""
    from ofa.artifact import INT8_ACCURACY, MEASUREMENTS, add_file
    from ofa.evaluate import accuracy
    from ofa.export import FORMATS, subnet_file
    from ofa.predict.measure import validation_set

    art_dir = served_copy(tiny_artifact, tmp_path / "art")  # trained: its accuracy is measured on its images
    art = load_artifact(art_dir)
    val, spec = validation_set(art.manifest["training"])
    archs = [art.space.smallest(), art.space.largest(), art.space.sample(5)]
    subnets = {a.id: {"arch": a.to_dict(), "macs": i + 1, "accuracy": accuracy(FORMATS["safetensors"].read(
        subnet_file(art, a, "safetensors").data), val, spec, a.resolution)} for i, a in enumerate(archs)}
    add_file(art_dir, MEASUREMENTS, json.dumps({"artifact": art.digest, "subnets": subnets, "val_images": len(val)}))
    # each runtime's int8 file (onnxruntime's quantizer; NNCF's for OpenVINO), run in that runtime, stored apart
    assert ofa_main(["int8-accuracy", "--artifact", str(art_dir), "--subnets", "3"]) == 0
    assert ofa_main(["int8-accuracy", "--artifact", str(art_dir), "--subnets", "2", "--backend", "openvino"]) == 0
    drops = json.loads((art_dir / INT8_ACCURACY).read_text())
    drop = drops["onnx_int8"]
    assert drop["subnets"] == 3 and drop["val_images"] == len(val) and abs(drop["mean_drop"]) < 20
    assert [r["fp32"] for r in drop["measured"]] == sorted(s["accuracy"] for s in subnets.values())
    assert drops["openvino_int8"]["subnets"] == 2 and "nncf" in drops["openvino_int8"]["quantizer"]
    table = json.loads((art_dir / "latency" / "synthetic-cpu.json").read_text())
    # the format a table records, else its backend's; one recording none predates API 1.5: onnxruntime's int8
    for name, backend, fmt in (("int8-cpu", "onnxruntime", {}),
                               ("int8-ov", "openvino", {"weights_format": "openvino_int8"}),
                               ("int8-other", "other", {"weights_format": "tflite"}), ("int8-old", "openvino", {})):
        add_file(art_dir, f"latency/{name}.json", json.dumps({**table, "target": name, "device": {
            **table["device"], "precision": "int8", "backend": backend, **fmt}}))
    srv = Server(Registry([str(art_dir)], None), ServeConfig(port=0, max_searches=1)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            fp32, ort, ov, other, old = (c.search(t, max_latency_ms=1e3, seed=2)
                                         for t in ("synthetic-cpu", "int8-cpu", "int8-ov", "int8-other", "int8-old"))
            assert ort.id == ov.id == fp32.id  # the same table: the same pick, its accuracy as the int8 file's
            for t in (ort, old):
                assert t.predicted_accuracy == pytest.approx(fp32.predicted_accuracy + drop["mean_drop"], abs=1e-3)
            assert ov.predicted_accuracy == pytest.approx(
                fp32.predicted_accuracy + drops["openvino_int8"]["mean_drop"], abs=1e-3)
            # a runtime whose quantizer this server does not know: no drop measured for it, none added
            assert other.predicted_accuracy == fp32.predicted_accuracy
            assert fp32.predicted_accuracy_low is None  # (the synthetic predictor has no interval: see below)
            kinds = {t["name"]: t["weights_format"] for t in c.targets()}
            assert [kinds[n] for n in ("int8-cpu", "int8-ov", "int8-other", "int8-old")] == [
                "WEIGHTS_FORMAT_ONNX_INT8", "WEIGHTS_FORMAT_OPENVINO_INT8", "WEIGHTS_FORMAT_UNSPECIFIED",
                "WEIGHTS_FORMAT_ONNX_INT8"]
            # a server without the quantizer's package: FAILED_PRECONDITION naming it, for a file and for a kit
            real = importlib.util.find_spec
            monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "nncf" else real(n, *a))
            with pytest.raises(Infeasible, match=r"needs the nncf package \(pip install nncf\)"):
                c.fetch(fp32, "openvino_int8")
            with pytest.raises(Infeasible, match="needs the nncf package"):
                c.fetch_kit(tmp_path / "no-kit", precision="int8", runtime="openvino")
    finally:
        srv.stop()
    # with an interval: the int8 one is the fp32 one moved by the drop, each side widened in quadrature
    from ofa.jobs.precision import at_int8
    from ofa.search import Candidate

    c = Candidate(art.space.smallest(), 80.0, 1, 1, accuracy_low=78.0, accuracy_high=81.0)
    moved = at_int8(c, {"mean_drop": -0.3, "sd": 0.2}, 0.9)
    assert moved.accuracy == pytest.approx(79.7)
    assert moved.accuracy - moved.accuracy_low == pytest.approx(np.hypot(2.0, 1.6449 * 0.2), abs=1e-3)
    assert moved.accuracy_high - moved.accuracy == pytest.approx(np.hypot(1.0, 1.6449 * 0.2), abs=1e-3)


@pytest.mark.parametrize("name, kind", [("../escape.json", tarfile.REGTYPE), ("/abs.json", tarfile.REGTYPE),
                                        ("nets/link.onnx", tarfile.SYMTYPE)], ids=["parent", "absolute", "link"])
def test_a_kit_tar_with_anything_but_files_inside_it_is_refused_before_writing(name, kind, tmp_path):
    import io

    from ofa_client import IntegrityError
    from ofa_client.client import unpack_kit

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("kit.json"), io.BytesIO(b""))
        evil = tarfile.TarInfo(name)
        evil.type, evil.linkname = kind, "/etc/passwd"
        tar.addfile(evil, io.BytesIO(b""))
    with pytest.raises(IntegrityError, match="not a file inside it"):
        unpack_kit(buf.getvalue(), tmp_path / "kit")
    assert not (tmp_path / "kit").exists() and not (tmp_path / "escape.json").exists()
