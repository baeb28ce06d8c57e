import copy
import json

import numpy as np
import pytest

from ofa.predict.latency import LatencyPredictor, LatencyTableError, Speed, block_plan, validate_table
from ofa_client.latency_model import FAMILIES, choose_and_fit, coefficients, model_dict, quality
from ofa.predict.profile import profile_space, recalibrate, speed_of
from ofa.predict.timing import Timing
from ofa.space import SearchSpace, StageSpec

TINY = SearchSpace(
    name="tiny-test", in_channels=1, num_classes=4, resolutions=(12, 16), stem_width=8, stem_stride=1,
    first_block_width=8, stages=(StageSpec(8, 2, "relu", False), StageSpec(16, 1, "h_swish", True)),
    final_expand_width=32, head_width=32, kernel_choices=(3, 5), expand_choices=(3, 4), depth_choices=(1, 2),
)
FAST = Timing(backend="torch", threads=1, rounds=2, samples=1, sample_ms=0.5, warmup_ms=1.0)
# (the default warm-up: the recalibration below re-times with the table's own protocol, and with 1 ms its passes
# were called noisy and left out often enough that one fresh-clone run kept a single pass)
FAST_FLAGS = ["--backend", "torch", "--threads", "1", "--rounds", "2", "--sample-ms", "0.5", "--subnets", "12",
              "--references", "4", "--no-progress"]


@pytest.fixture(scope="module")
def table():
    return profile_space(TINY, "test-cpu", FAST, subnets=16, references=4, progress=False)


def test_profiling_a_tiny_space_end_to_end(table):
    entries, _, _ = block_plan(TINY)
    assert set(table["entries"]) == set(entries) and all(v > 0 for v in table["entries"].values())
    assert table["version"] == 2 and table["device"]["threads"] == 1 and table["device"]["backend"] == "torch"
    assert table["timing"]["rounds"] == 2 and "trusted" in table["timing"]["repeatability"]
    refs = LatencyPredictor(TINY, table).references
    assert len(refs) == 4 and all(ms > 0 for _, ms in refs)
    assert refs[0][0] == TINY.smallest(12) and refs[1][0] == TINY.largest(16)  # the corners first
    fit = table["fit"]
    assert fit["subnets"] == 4 + 12 and fit["held_out"] == 4  # a quarter of the random ones held out
    assert table["model"]["family"] in FAMILIES and set(fit["cv"]) == set(FAMILIES)
    assert {"within_10pct", "spearman", "mean_abs_rel_error"} <= set(fit["quality"]["held_out"])


def test_the_fitted_model_round_trips_through_the_table_file(table, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    back = LatencyPredictor(TINY, json.loads(path.read_text()))
    codes = TINY.sample_codes(3, 50)
    assert np.array_equal(back(codes), LatencyPredictor(TINY, table)(codes)) and np.all(back(codes) > 0)
    coef = coefficients(table["model"], TINY.resolutions)
    assert model_dict(table["model"]["family"], coef, TINY.num_stages, TINY.resolutions) == table["model"]


def test_the_prediction_is_the_model_over_the_arch_blocks(table):
    model = {"family": "stages+blocks+resolution", "fixed_scale": 1.5, "stage_scale": [2.0, 0.5],
             "block_ms": -0.01, "offset_ms": {"12": 0.2, "16": 0.3}}
    pred = LatencyPredictor(TINY, {**table, "model": model})
    _, fixed, slots = block_plan(TINY)
    for arch in TINY.sample(1, n=20):
        code = TINY.encode([arch])
        want = 1.5 * sum(table["entries"][k] for k in fixed[arch.resolution]) + model["offset_ms"][str(arch.resolution)]
        for slot in np.flatnonzero(TINY.active_mask(code)[0]):
            key = slots[(arch.resolution, int(slot), int(code[0, slot]), int(code[0, TINY.num_slots + slot]))]
            want += model["stage_scale"][slot // TINY.max_depth] * table["entries"][key] + model["block_ms"]
        assert pred.raw(code)[0] == pytest.approx(want)
        assert pred(code)[0] == pytest.approx(want)
        assert pred.with_speed(Speed(1.25))(code)[0] == pytest.approx(1.25 * want)  # the device's speed maps it
    recal = LatencyPredictor(TINY, {**table, "model": model, "recalibration": {"scale": 0.8, "offset_ms": 0.1}})
    assert recal(TINY.encode([arch]))[0] == pytest.approx(0.8 * want + 0.1)


def test_a_speed_is_a_scale_or_also_an_offset_when_that_predicts_the_references_better():
    then = np.array([0.3, 0.5, 0.8, 1.0, 1.4, 1.9, 0.6, 1.2, 0.4, 1.6])
    assert Speed.fit(then, 1.3 * then).scale == pytest.approx(1.3) and Speed.fit(then, 1.3 * then).offset_ms == 0
    # a per-call cost that changed more than the compute: small subnets x0.69, large ones x0.92 (measured)
    shifted = Speed.fit(then, 0.95 * then - 0.08)
    assert shifted.scale == pytest.approx(0.95) and shifted.offset_ms == pytest.approx(-0.08)
    noisy = 1.1 * then * (1 + 0.02 * np.random.default_rng(0).standard_normal(len(then)))
    assert Speed.fit(then, noisy).offset_ms == 0.0  # noise alone does not buy an offset
    assert Speed.fit([1.0, 2.0], [2.0, 5.0]) == Speed(2.25)  # too few for an offset: the median ratio
    with pytest.raises(ValueError, match="needs one time now > 0"):
        Speed.fit([1.0], [0.0])


def test_a_speed_timed_in_passes_carries_how_far_they_lay_apart():
    then = np.array([0.3, 0.5, 0.8, 1.0, 1.4, 1.9, 0.6, 1.2, 0.4, 1.6])
    # three passes in fresh workers: the machine at x0.90, x1.00 and x0.95 of its profiled speed
    rows = np.concatenate([f * then for f in (0.90, 1.00, 0.95)])
    speed = Speed.fit_passes(np.tile(then, 3), rows, np.repeat([0, 1, 2], len(then)))
    assert speed.scale == pytest.approx(0.95) and speed.passes == 3
    assert speed.spread == pytest.approx(0.10 / 0.95) and speed.unsettled and "3 passes 10.5% apart: unsettled" in \
        speed.describe()
    back = Speed.from_dict(speed.to_dict())  # as a table's recalibration stores it
    assert back.passes == 3 and back.spread == pytest.approx(speed.spread, abs=1e-5)
    agreed = Speed.fit_passes(np.tile(then, 2), np.concatenate([then, 1.02 * then]), np.repeat([0, 1], len(then)))
    assert agreed.passes == 2 and agreed.spread == pytest.approx(0.02 / 1.01) and not agreed.unsettled
    one = Speed.fit_passes(then, 1.1 * then, np.zeros(len(then)))
    assert (one.spread, one.passes, one.unsettled) == (0.0, 1, False) and Speed().to_dict() == {"scale": 1.0,
                                                                                                "offset_ms": 0.0}


def test_model_families_are_chosen_by_cross_validation():
    rng = np.random.default_rng(0)
    n, stages = 80, 2
    fixed = rng.uniform(0.1, 0.2, n)
    stage_sums = rng.uniform(0.2, 1.0, (n, stages))
    blocks = rng.integers(2, 8, n).astype(float)
    res = np.eye(2)[rng.integers(0, 2, n)]
    x = np.column_stack([fixed, stage_sums, blocks, res])
    # timings made by a per-call overhead the blocks timed alone each paid: "scale+blocks" explains them
    y = 0.9 * (fixed + stage_sums.sum(1)) - 0.02 * blocks + 0.05
    family, coef, cv = choose_and_fit(x, y, stages)
    assert family == "scale+blocks" and cv[family] < 1e-3 < cv["sum"]
    assert coef[1 + stages] == pytest.approx(-0.02, abs=1e-3)
    # the sum as timed, exactly: the simplest family wins the tie
    assert choose_and_fit(x, x[:, :1 + stages].sum(1), stages)[0] == "sum"
    q = quality(y * 1.05, y)
    assert q["within_10pct"] == 1.0 and q["spearman"] == pytest.approx(1.0) and q["mean_abs_rel_error"] == pytest.approx(0.05)


def test_recalibration_re_times_the_references_and_scales_the_table(table):
    slow = {**table, "references": [{**r, "ms": r["ms"] / 3} for r in table["references"]]}
    # the arithmetic of a re-timing, whatever the noise (the gate on noise: tests/test_readiness.py)
    recal, timings = recalibrate(TINY, slow, progress=False, rounds=2, accept_noisy=True)
    r = recal["recalibration"]
    profiled = np.array([x["ms"] for x in slow["references"]])
    speed = Speed.from_dict(r)
    passes = timings.pass_ms()  # a noisy first pass (accepted) is the only one; else 2 or 3 in fresh workers
    assert len(passes) == max(1, len(timings.passes))
    fitted = speed_of(passes, profiled)[1]
    assert fitted.passes == len(passes) and Speed.fit_passes(np.tile(profiled, len(passes)), np.concatenate(passes),
                                                             np.repeat(np.arange(len(passes)), len(profiled))) == fitted
    assert (speed.scale, speed.offset_ms, speed.spread, speed.passes) == pytest.approx(
        (fitted.scale, fitted.offset_ms, fitted.spread, fitted.passes), abs=1e-4)
    assert r["ratios"] == pytest.approx(np.median([m / profiled for m in passes], axis=0), rel=1e-3) and speed.scale > 0
    assert r["measured_at"].endswith("Z") and "verdict" in r["repeatability"]
    codes = TINY.sample_codes(0, 10)
    validate_table(recal, TINY)
    assert np.allclose(LatencyPredictor(TINY, recal)(codes), speed.apply(LatencyPredictor(TINY, slow)(codes)),
                       rtol=1e-5)


def test_a_speed_no_table_may_record_is_refused_with_what_to_do():
    profiled = np.array([1.0, 2.0, 4.0, 8.0])
    with pytest.raises(ValueError, match=r"the re-timed references imply the device runs at x0\.001 of its profiled "
                                         r"time; only x0\.01 to x100 is accepted .* profile this target again"):
        speed_of(profiled / 1000, profiled)  # a table of another device or runtime (a torch table, onnxruntime now)
    ratios, speed = speed_of(profiled / 1000, profiled, check=False)  # a measurement reported as it was
    assert speed.scale == pytest.approx(0.001) and ratios == [0.001] * 4
    assert speed_of(profiled / 50, profiled)[1].scale == pytest.approx(0.02)  # within the range


def test_a_version_1_table_is_refused_with_what_to_do(table):
    old = {k: v for k, v in table.items() if k not in ("model", "fit", "timing")}
    old.update(version=1, correction={"scale": 1.0, "offset_ms": 0.0})
    with pytest.raises(LatencyTableError, match=r"version 1 latency table .* profile the device again"):
        validate_table(old, TINY)


def _first_entry(t):
    return next(iter(t["entries"]))


def _nested(depth: int) -> dict:
    """An object ``depth`` levels deep inside the table's own levels (a client's table once nested ~1000)."""
    out: dict = {}
    for _ in range(depth):
        out = {"a": out}
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update(format="csv"), "format must be 'ofa-latency-table'"),
    (lambda t: t.update(version=3), "version must be 2"),
    (lambda t: t.update(target="my laptop!"), "target must be 1-64 characters"),
    (lambda t: t.update(target=""), "target must be 1-64 characters"),
    (lambda t: t.update(device="cpu"), "device must be an object"),
    (lambda t: t.update(entries={}), "entries must be a non-empty object"),
    (lambda t: t["entries"].update({_first_entry(t): -1.0}), r"milliseconds in \(0, 1e\+06\]"),
    (lambda t: t["entries"].update({_first_entry(t): 0}), r"milliseconds in \(0, 1e\+06\]"),
    # sums of such entries overflowed in a search
    (lambda t: t["entries"].update({_first_entry(t): 1e308}), r"milliseconds in \(0, 1e\+06\]"),
    (lambda t: t["device"].update(threads="four"), r"device.threads must be an integer in 1..1024"),
    (lambda t: t["device"].update(batch=2 ** 40), r"device.batch must be an integer in 1..65536"),
    (lambda t: t["device"].update(cpu=["x"]), r"device.cpu must be a string"),
    (lambda t: t["device"].update(memory_format="nhwc"), r"device.memory_format must be 'nchw' or 'channels_last'"),
    (lambda t: t.update(timing=[1]), "timing must be an object"),
    (lambda t: t["timing"].update(rounds=1), r"timing.rounds must be an integer in 2..10000"),
    (lambda t: t["fit"]["quality"]["held_out"].update(within_10pct=2), r"fit.quality.held_out.within_10pct must be"),
    (lambda t: t["fit"].update(cv={"sum": "x"}), r"fit.cv must be"),
    (lambda t: t.pop("model"), "model must be an object"),
    (lambda t: t["model"].pop("block_ms"), "model.block_ms is required"),
    (lambda t: t["model"].update(stage_scale=[1.0]), "model.stage_scale has 1 values; space 'tiny-test' has 2"),
    (lambda t: t["model"].update(stage_scale=[0, 1]), r"model.stage_scale must be a list of 1..64 numbers in \(0"),
    (lambda t: t["model"].update(fixed_scale=float("inf")), "model.fixed_scale must be"),
    (lambda t: t["model"].update(offset_ms={"12": 0.0}), "model.offset_ms must have one value for each resolution"),
    (lambda t: t["model"].update(offset_ms={"x": 0.0}), "model.offset_ms must be an object"),
    (lambda t: t.update(recalibration={"ratios": [1.0]}), "recalibration.scale is required"),
    (lambda t: t.update(recalibration={"scale": 0}), r"recalibration.scale must be a number in \[0.01, 100\]"),
    (lambda t: t["entries"].update({_first_entry(t): float("nan")}), r"milliseconds in \(0, 1e\+06\]"),
    (lambda t: t["entries"].update({_first_entry(t): "fast"}), r"milliseconds in \(0, 1e\+06\]"),
    (lambda t: t["entries"].pop(_first_entry(t)), "entries lack 1 block keys"),
    (lambda t: t["space"].update(digest="0" * 64), "digest mismatch"),
    (lambda t: t["entries"].update({_first_entry(t): 10 ** 400}), r"milliseconds in \(0, 1e\+06\]"),
    (lambda t: t["entries"].update({"x" * 300: 1.0}), "at most 200 characters"),
    (lambda t: t["references"][0].update(ms=-1), r"references\[0\] must be"),
    (lambda t: t["references"][0].update(ms=1e308), r"references\[0\] must be .* a number in \(0, 1e\+06\]"),
    (lambda t: t["model"].update(offset_ms={"012": 0.0, "16": 0.0}), r"resolution \(as '28', not '028'\)"),
    (lambda t: t["model"].update(offset_ms={"\u00b2": 0.0, "16": 0.0}), r"resolution \(as '28', not '028'\)"),
    (lambda t: t["timing"].update(repeatability=_nested(17)), "nests objects and lists at most 16 deep"),
    (lambda t: t["device"].update(extra=[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]), "at most 16 deep"),
    (lambda t: t["timing"].update(repeatability={"trusted": False, "verdict": "v" * 1001}),
     "timing.repeatability.verdict must be a string of at most 1000 characters"),
    (lambda t: t["timing"].update(repeatability={"trusted": "no"}), "timing.repeatability.trusted must be true or"),
    (lambda t: t.update(references={"arch": {}}), "references must be a list"),
    (lambda t: t["references"][1]["arch"].update(resolution=13), r"references\[1\].arch: resolution"),
], ids=lambda x: x if isinstance(x, str) else "")
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
    with pytest.raises(LatencyTableError, match="digest mismatch"):  # the space is the reason given
        validate_table(table, other)


def test_a_table_that_is_not_an_object_is_refused():
    with pytest.raises(LatencyTableError, match="must be a JSON object, got list"):
        validate_table([1, 2])


def _tiny_artifact(path):
    import torch

    from ofa.artifact import write_artifact
    from ofa.data import DataSpec
    from ofa.supernet import Supernet

    spec = DataSpec("tiny", 1, 16, 4, (0.5,), (0.5,), ("a", "b", "c", "d"))
    write_artifact(path, Supernet(TINY), spec, torch.zeros(4, 1, 16, 16, dtype=torch.uint8), {}, {})
    return path


def test_profile_command_writes_into_an_artifact_and_recalibrates_it(tmp_path, capsys):
    from ofa.artifact import load_artifact
    from ofa.cli import main

    art = _tiny_artifact(tmp_path / "art")
    digest = load_artifact(art).digest
    assert main(["profile", "--artifact", str(art), "--target", "ci-cpu", *FAST_FLAGS]) == 0
    table = json.loads((art / "latency" / "ci-cpu.json").read_text())
    validate_table(table, TINY)
    manifest = load_artifact(art).manifest  # the manifest records the new file's sha256
    assert "latency/ci-cpu.json" in manifest["files"] and load_artifact(art).digest == digest
    capsys.readouterr()
    assert main(["info", "--artifact", str(art), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    t = info["targets"]["ci-cpu"]
    assert t["blocks"] == len(table["entries"]) and t["model"] == table["model"] and t["recalibration"] is None
    timings = tmp_path / "now.json"
    # what is checked is the path (the gate itself: tests/test_readiness.py): three noisy tries in a row on a
    # busy machine must not fail it
    assert main(["profile", "--recalibrate", "--artifact", str(art), "--target", "ci-cpu", "--timings-out",
                 str(timings), "--no-progress", "--accept-noisy-timing"]) == 0
    assert "reference subnets re-timed" in capsys.readouterr().out
    recal = json.loads((art / "latency" / "ci-cpu.json").read_text())["recalibration"]
    sent = json.loads(timings.read_text())
    refs = LatencyPredictor(TINY, table).references
    # each reference once per kept pass, in the same order; a pass the protocol calls noisy is left out, so a
    # noisy spell can leave one, whose rows carry no pass index (the API's form for a single pass)
    rows, passes = sent["reference_timings"], recal["passes"]
    assert sent["target"] == "ci-cpu" and [t["subnet_id"] for t in rows] == [a.id for a, _ in refs] * passes
    index = [t.get("pass_index", 0) for t in rows]
    assert passes >= 1 and index == sorted(index) and ("pass_index" in rows[0]) == (passes > 1)
    fitted = Speed.fit_passes([ms for _, ms in refs] * passes, [t["ms"] for t in rows], index)
    assert (recal["scale"], recal["offset_ms"], recal["spread"]) == pytest.approx(
        (fitted.scale, fitted.offset_ms, fitted.spread), abs=1e-4)
    assert main(["info", "--artifact", str(art)]) == 0
    assert "speed: x" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--target", "../escape"], "target must be 1-64 characters"),
    (["--target", "x", "--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["--target", "x", "--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["--target", "x", "--rounds", "1"], "--rounds must be an integer >= 2, got 1"),
    (["--target", "x", "--sample-ms", "0"], "--sample-ms must be > 0"),
    (["--target", "x", "--warmup-ms", "inf"], "--warmup-ms must be > 0"),
    (["--target", "x", "--references", "0"], "--references must be in 1..64"),
    (["--target", "x", "--held-out", "1"], r"--held-out must be in \[0, 1\)"),
    (["--target", "x", "--backend", "onnxruntime", "--channels-last"], "--channels-last applies to the torch"),
    (["--recalibrate"], "--recalibrate needs --table FILE"),
], ids=["target", "threads", "batch", "rounds", "sample-ms", "warmup-ms", "references", "held-out", "channels-last",
        "recalibrate-alone"])
def test_profile_flags_are_refused_before_any_timing(args, message, capsys):
    import re

    from ofa.cli import main

    assert main(["profile", "--space", "mbv3-small-images", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_an_old_table_in_an_artifact_is_named_not_fatal(tmp_path, table, capsys):
    from ofa.artifact import add_file
    from ofa.cli import main
    from ofa.search.load import load_scorer
    from ofa.search import UnknownTarget

    art = _tiny_artifact(tmp_path / "art")
    old = {**{k: v for k, v in table.items() if k not in ("model", "fit", "timing")}, "version": 1, "target": "old"}
    add_file(art, "latency/old.json", json.dumps(old))
    add_file(art, "latency/new.json", json.dumps({**table, "target": "new"}))
    scorer = load_scorer(art)
    assert "new" in scorer.latency and "old" in scorer.refused
    with pytest.raises(UnknownTarget, match="version 1 latency table"):
        scorer.latency_of("old")
    assert main(["info", "--artifact", str(art)]) == 0
    assert "old: not usable: this is a version 1 latency table" in capsys.readouterr().out


def test_profile_from_a_space_file_as_a_device_would(tmp_path, capsys):
    import subprocess
    import sys

    from ofa.cli import main

    (tmp_path / "space.json").write_text(TINY.to_json())
    out = tmp_path / "dev.json"
    # a device has torch, numpy, tqdm, onnx (with protobuf), onnxruntime and ofa/ (README): nothing else imports
    script = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("safetensors", "torchvision", "grpc", "matplotlib", "scipy", "sklearn"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Absent())
from ofa.cli import main
sys.exit(main(["profile", "--space-file", {str(tmp_path / "space.json")!r}, "--target", "dev", "--out",
               {str(out)!r}, "--backend", "onnxruntime", "--threads", "1", "--rounds", "2", "--sample-ms", "0.5",
               "--warmup-ms", "1", "--subnets", "0", "--references", "2", "--no-progress"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dev = json.loads(out.read_text())
    validate_table(dev, TINY)
    assert dev["device"]["backend"] == "onnxruntime" and dev["device"]["backend_version"]
    assert dev["model"]["family"] == "sum" and dev["fit"]["held_out"] == 2  # too few subnets for a model
    (tmp_path / "bad.json").write_text('{"name": "x"}')
    assert main(["profile", "--space-file", str(tmp_path / "bad.json"), "--target", "dev"]) == 2
    assert "is not a search-space definition" in capsys.readouterr().err


def test_an_int8_target_times_quantized_networks(tmp_path, backend="onnxruntime"):
    """--precision int8: every block and subnet quantized as the backend's served int8 file is, then timed; the
    table says so, and which file its device runs (openvino_int8, NNCF's: tests/test_kit.py, through a kit)."""
    from ofa.cli import main
    from ofa.predict.latency import table_format

    (tmp_path / "space.json").write_text(TINY.to_json())
    out = tmp_path / "int8.json"
    assert main(["profile", "--space-file", str(tmp_path / "space.json"), "--target", "dev-int8", "--out", str(out),
                 "--precision", "int8", "--backend", backend, "--threads", "1", "--rounds", "2", "--sample-ms", "0.5",
                 "--warmup-ms", "1", "--subnets", "0", "--references", "2", "--no-progress"]) == 0
    table = validate_table(json.loads(out.read_text()), TINY)
    assert table["device"]["precision"] == "int8" and all(v > 0 for v in table["entries"].values())
    from ofa.predict.profile import timing_of_table

    assert timing_of_table(table).precision == "int8"
    assert table_format(table) == {"onnxruntime": "onnx_int8", "openvino": "openvino_int8"}[backend]
