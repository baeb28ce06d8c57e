import copy
import json

import numpy as np
import pytest

from ofa.predict.latency import LatencyPredictor, LatencyTableError, block_plan, validate_table
from ofa.predict.profile import profile_space
from ofa.space import SearchSpace, StageSpec

TINY = SearchSpace(
    name="tiny-test", in_channels=1, num_classes=4, resolutions=(12, 16), stem_width=8, stem_stride=1,
    first_block_width=8, stages=(StageSpec(8, 2, "relu", False), StageSpec(16, 1, "h_swish", True)),
    final_expand_width=32, head_width=32, kernel_choices=(3, 5), expand_choices=(3, 4), depth_choices=(1, 2),
)


@pytest.fixture(scope="module")
def table():
    return profile_space(TINY, "test-cpu", threads=1, min_run_time=0.002, calibrate=3, progress=False)


def test_profiling_a_tiny_space_end_to_end(table):
    entries, _, _ = block_plan(TINY)
    assert set(table["entries"]) == set(entries)
    assert all(v > 0 for v in table["entries"].values())
    assert table["device"]["threads"] == 1 and table["device"]["backend"] == "torch"
    assert table["calibration"]["archs"] == 2 * len(TINY.resolutions) + 6  # corners + 2 x calibrate
    assert table["calibration"]["checked"] == 3 and table["calibration"]["rounds"] == 3
    ref_arch, ref_ms = LatencyPredictor(TINY, table).reference  # the drift reference, timed end to end
    assert ref_arch.resolution == 16 and ref_ms > 0
    # and the corners, timed end to end for the correction, re-timed later with it to measure drift
    timed = LatencyPredictor(TINY, table).references
    corners = [f(r) for r in TINY.resolutions for f in (TINY.smallest, TINY.largest)]
    assert [a for a, _ in timed] == [ref_arch, *corners] and all(ms > 0 for _, ms in timed)
    back = json.loads(json.dumps(table))
    pred = LatencyPredictor(TINY, back)
    archs = TINY.sample(0, n=50)
    ms = pred(TINY.encode(archs))
    assert ms.shape == (50,) and np.all(ms > 0)


def test_prediction_is_the_sum_of_the_arch_blocks(table):
    pred = LatencyPredictor(TINY, {**table, "correction": {"scale": 2.0, "offset_ms": 1.0}})
    entries, fixed, slots = block_plan(TINY)
    for arch in TINY.sample(1, n=20):
        code = TINY.encode([arch])
        want = sum(table["entries"][k] for k in fixed[arch.resolution])
        active = TINY.active_mask(code)[0]
        for slot in np.flatnonzero(active):
            ki = code[0, slot]
            ei = code[0, TINY.num_slots + slot]
            want += table["entries"][slots[(arch.resolution, int(slot), int(ki), int(ei))]]
        assert pred.raw(code)[0] == pytest.approx(want)
        assert pred(code)[0] == pytest.approx(2 * want + 1)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update(format="csv"), "format must be 'ofa-latency-table'"),
    (lambda t: t.update(version=2), "version must be 1"),
    (lambda t: t.update(target="my laptop!"), "target must be 1-64 characters"),
    (lambda t: t.update(target=""), "target must be 1-64 characters"),
    (lambda t: t.update(device="cpu"), "device must be an object"),
    (lambda t: t.update(entries={}), "entries must be a non-empty object"),
    (lambda t: t["entries"].update({next(iter(t["entries"])): -1.0}), "must be a finite number of milliseconds > 0"),
    (lambda t: t["entries"].update({next(iter(t["entries"])): 0}), "milliseconds > 0"),
    (lambda t: t["device"].update(threads="four"), r"device.threads must be an integer in 1..1024"),
    (lambda t: t["device"].update(batch=2 ** 40), r"device.batch must be an integer in 1..65536"),
    (lambda t: t["device"].update(cpu=["x"]), r"device.cpu must be a string"),
    (lambda t: t["device"].update(memory_format="nhwc"), r"device.memory_format must be 'nchw' or 'channels_last'"),
    (lambda t: t.update(calibration=[1]), "calibration must be an object"),
    (lambda t: t.update(calibration={"kept": 1}), "calibration.kept must be true or false"),
    (lambda t: t.update(calibration={"mean_abs_rel_error_raw": "x"}), "calibration.mean_abs_rel_error_raw must be"),
    (lambda t: t["entries"].update({next(iter(t["entries"])): float("nan")}), "finite number"),
    (lambda t: t["entries"].update({next(iter(t["entries"])): "fast"}), "finite number"),
    (lambda t: t["entries"].pop(next(iter(t["entries"]))), "entries lack 1 block keys"),
    (lambda t: t["space"].update(digest="0" * 64), "digest mismatch"),
    (lambda t: t.update(correction={"scale": 0, "offset_ms": 0}), "correction must be"),
    (lambda t: t.update(correction={"scale": 1}), "correction must be"),
    (lambda t: t.update(correction={"scale": True, "offset_ms": 0}), "correction must be"),
    (lambda t: t["entries"].update({next(iter(t["entries"])): 10 ** 400}), "finite number"),
    (lambda t: t["entries"].update({"x" * 300: 1.0}), "at most 200 characters"),
    (lambda t: t["reference"].update(ms=0), "reference must be"),
    (lambda t: t.update(reference={"arch": {}}), "reference must be"),
    (lambda t: t["reference"]["arch"].update(resolution=13), "reference.arch: resolution"),
    (lambda t: t["references"][0].update(ms=-1), r"references\[0\] must be"),
    (lambda t: t.update(references={"arch": {}}), "references must be a list"),
    (lambda t: t["references"][1]["arch"].update(resolution=13), r"references\[1\].arch: resolution"),
])
def test_malformed_tables_are_refused(table, edit, message):
    bad = copy.deepcopy(table)
    edit(bad)
    with pytest.raises(LatencyTableError, match=message):
        validate_table(bad, TINY)
    with pytest.raises(LatencyTableError):
        LatencyPredictor(TINY, bad)


def test_a_table_of_another_space_is_refused_for_its_space(table):
    import dataclasses

    other = dataclasses.replace(TINY, name="other", resolutions=(20, 24))
    # Its reference resolution (16) is not one of `other`'s either; the space is the reason given.
    with pytest.raises(LatencyTableError, match="digest mismatch"):
        validate_table(table, other)


def test_a_table_that_is_not_an_object_is_refused():
    with pytest.raises(LatencyTableError, match="must be a JSON object, got list"):
        validate_table([1, 2])


def test_profile_command_writes_into_an_artifact(tmp_path, capsys):
    import torch

    from ofa.artifact import load_artifact, write_artifact
    from ofa.cli import main
    from ofa.data import DataSpec
    from ofa.supernet import Supernet

    spec = DataSpec("tiny", 1, 16, 4, (0.5,), (0.5,), ("a", "b", "c", "d"))
    write_artifact(tmp_path, Supernet(TINY), spec, torch.zeros(4, 1, 16, 16, dtype=torch.uint8), {}, {})
    digest = load_artifact(tmp_path).digest
    args = ["profile", "--artifact", str(tmp_path), "--target", "ci-cpu", "--threads", "1",
            "--min-run-time", "0.002", "--rounds", "1", "--calibrate", "2", "--no-progress"]
    assert main(args) == 0
    table = json.loads((tmp_path / "latency" / "ci-cpu.json").read_text())
    validate_table(table, TINY)
    art = load_artifact(tmp_path)  # the manifest records the new file's sha256
    assert "latency/ci-cpu.json" in art.manifest["files"] and art.digest == digest
    capsys.readouterr()
    assert main(["info", "--artifact", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["targets"]["ci-cpu"]["blocks"] == len(table["entries"])
    assert main(["profile", "--artifact", str(tmp_path), "--target", "../escape"]) == 2
    assert "target must be 1-64 characters" in capsys.readouterr().err
    assert main(["profile", "--space", "tiny-test", "--artifact", str(tmp_path), "--target", "x"]) == 2
    for flag in ("--threads", "--batch", "--rounds"):  # refused before any timing, naming the flag
        assert main(["profile", "--space", "mbv3-small-images", "--target", "x", flag, "0"]) == 2
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_profile_from_a_space_file_as_a_device_would(tmp_path, capsys):
    import subprocess
    import sys

    from ofa.cli import main

    (tmp_path / "space.json").write_text(TINY.to_json())
    out = tmp_path / "dev.json"
    # a device has torch, numpy, tqdm and ofa/ (README): every other package is made unimportable
    script = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("safetensors", "torchvision", "grpc", "google", "matplotlib", "onnx",
                                  "onnxruntime", "scipy", "sklearn"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Absent())
from ofa.cli import main
sys.exit(main(["profile", "--space-file", {str(tmp_path / "space.json")!r}, "--target", "dev", "--out",
               {str(out)!r}, "--threads", "1", "--min-run-time", "0.002", "--rounds", "1", "--calibrate", "0",
               "--no-progress"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    validate_table(json.loads(out.read_text()), TINY)
    (tmp_path / "bad.json").write_text('{"name": "x"}')
    assert main(["profile", "--space-file", str(tmp_path / "bad.json"), "--target", "dev"]) == 2
    assert "is not a search-space definition" in capsys.readouterr().err


def test_profiling_with_onnxruntime_times_the_exported_blocks():
    pytest.importorskip("onnxruntime")
    table = profile_space(TINY, "test-ort", threads=1, min_run_time=0.002, calibrate=2, rounds=1, progress=False,
                          backend="onnxruntime")
    assert table["device"]["backend"] == "onnxruntime" and table["device"]["backend_version"]
    entries, _, _ = block_plan(TINY)
    assert set(table["entries"]) == set(entries) and all(v > 0 for v in table["entries"].values())
    validate_table(table, TINY)
    assert LatencyPredictor(TINY, table).reference[1] > 0


def test_bad_backends_are_refused(capsys):
    from ofa.cli import main

    with pytest.raises(ValueError, match="backend must be one of"):
        profile_space(TINY, "x", backend="tflite")
    with pytest.raises(ValueError, match="channels_last applies to the torch backend only"):
        profile_space(TINY, "x", backend="onnxruntime", channels_last=True)
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "--space", "tiny-test", "--target", "x", "--backend", "tvm"])
    assert exit_.value.code == 2
    assert "invalid choice: 'tvm'" in capsys.readouterr().err
