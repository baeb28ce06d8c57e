"""The README's main command on a tiny budget, and `ofa report` with a baseline.

Both run the real path: training, predictor fitting, profiling, an `ofa serve` child
process on 127.0.0.1 with an OS-chosen port, the `ofa-client` CLI, measurement.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import FEW_STEPS, served_copy, tiny_args

from ofa.cli import main
from ofa.predict.latency import Speed

# the protocol at its smallest: two passes of one short sample per network, few subnets to fit
_FAST_PROFILE = ["--profile-rounds", "2", "--profile-sample-ms", "0.5", "--profile-warmup-ms", "1",
                 "--profile-subnets", "12", "--no-progress"]
# a table's protocol at its smallest, in worker runs the repeatability check trusts more often than one call per
# sample (half of those failed it here; each retry is a fresh worker, ~4 s with torch's imports)
_FAST_TIMING = {"rounds": 4, "samples": 2, "sample_ms": 1.0, "warmup_ms": 1.0}
# what these tests check is the path, not this machine's quiet: a timing the check calls noisy is used, labelled
# (on a busy CI machine three tries all failed it); the gate itself: tests/test_readiness.py
_NOISY_OK = "--accept-noisy-timing"
# the ridge families only: the MLPs' fits were 170 of the test's 250 s here (tests/test_accuracy.py fits them)
_FAST_FIT = ["--families", "ridge-3,ridge-30"]


def _run(args, tmp_path):
    env = {**os.environ, "OFA_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "ofa", *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_budget(tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    sets = [x for a in tiny_args(tiny_data, FEW_STEPS) for x in ("--set", a)]
    r = _run(["demo", "--out", str(out), *sets, "--samples", "12", "--front", "2", *_FAST_PROFILE, *_FAST_FIT,
              _NOISY_OK], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("[1/5] train", "[2/5] profile", "[3/5] measure", "[4/5] serve", "[5/5] report"):
        assert step in r.stdout
    # the searches carry this machine's speed now, as a device's pipeline does
    timings = out / "reference-timings.json"
    assert f"$ ofa-client search --target this-machine --reference-timings {timings} --max-latency-ms" in r.stdout
    assert "server stopped (exit code 0)" in r.stdout

    report = json.loads((out / "report.json").read_text())
    served = report["served"]
    assert [s["label"] for s in served] == ["tight", "middle", "loose"]
    budgets = [s["budget_ms"] for s in served]
    assert budgets == sorted(budgets) and len(set(budgets)) == 3
    speed = Speed.from_dict(report["reference"]["speed_before"])
    for s in served:  # the server fitted the speed the report did, from the timings sent
        assert s["predicted_latency_ms"] <= s["budget_ms"] and s["speed"] == pytest.approx(speed.scale, rel=1e-3)
        assert s["predicted_latency_ms"] == pytest.approx(float(speed.apply(s["raw_predicted_latency_ms"])), rel=1e-3)
        for fmt in ("safetensors", "onnx"):  # onnxruntime, the default target: the ONNX file fetched is timed
            f = s["files"][fmt]
            data = (out / f["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
        assert 0 <= s["test_accuracy"] <= 100 and s["measured_latency_ms"] > 0
    assert report["health"] == "SERVING" and report["device"]["backend"] == "onnxruntime"
    assert report["reference"]["subnets"] == 10 and len(report["reference"]["ratios_after"]) == 10
    assert isinstance(report["reference"]["speed_changed"], bool) and report["reference"]["speed_change"] > 0
    assert set(report["steps_seconds"]) >= {"train", "predictors", "profile", "total"}
    md = (out / "report.md").read_text()
    assert md.count("| `") == 3 and "![Pareto front](pareto.png)" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stopped" in (out / "server.log").read_text()  # SIGTERM, graceful

    # a second run reuses the trained supernet and the measured subnets (its steps 1 and 3 here, in-process:
    # step 4 would serve and measure again, and is the same code as above)
    from ofa.jobs.demo import _train_step
    from ofa.jobs.predictors import LOOP_BUDGETS, LOOP_ROUNDS, build_accuracy_predictor
    from ofa.train import load_config

    lines = []
    _train_step(out / "supernet", "quick", load_config("quick", None, tiny_args(tiny_data, FEW_STEPS)), False,
                lines.append)
    assert lines == ["  already trained: reusing it (delete the folder to train again)"]
    assert "latency front of 'this-machine'" in r.stdout
    rep = build_accuracy_predictor(out / "supernet", samples=12, front=2, front_target="this-machine",
                                   families=_FAST_FIT[1].split(","), loop_rounds=LOOP_ROUNDS,
                                   loop_budgets=LOOP_BUDGETS, progress=False, log=lines.append)  # the demo's
    # the front rounds went along this machine's latency front, and are found measured (a round whose front held
    # nothing new finds that again: the picks are a function of what was measured); so is the fit
    assert sum("were measured before" in line or "holds no subnet this run has not measured" in line
               for line in lines) == 2 and rep["reused"], lines
    assert not any("front round" in line and "measuring" in line for line in lines), lines
    # other training settings into the same folder are refused, not served from the old supernet
    monkeypatch.setenv("OFA_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["demo", "--out", str(out), *sets, "--set", "seed=5", *_FAST_PROFILE]) == 2
    assert "trained with different values of ['seed']" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--samples", "5"), ("--budgets", "0"), ("--profile-rounds", "1"),
                                         ("--profile-sample-ms", "0"), ("--profile-warmup-ms", "-1"),
                                         ("--profile-subnets", "-1"), ("--target", "a b"), ("--families", "lasso")])
def test_demo_refuses_bad_numbers_before_any_work(flag, value, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), flag, value, "--no-progress"]) == 2
    assert f"{flag} must be" in capsys.readouterr().err  # the message names the flag given
    assert not (tmp_path / "demo").exists()


def test_report_of_an_int8_target_with_a_baseline(tiny_artifact, tmp_path):
    """An int8 target (onnxruntime) with a baseline: the report fetches the onnx_int8 files, times them with the
    references and the baseline quantized alike, and tests each at int8 and, beside it, in fp32 (what quantization
    cost). The table's block times are made-up numbers 100 times too slow, its references "timed" at 20 ms: the
    report must re-time the references, and find the latency off whatever this machine's speed (a torch target's
    served file is timed in tests/test_timing.py)."""
    from ofa.artifact import add_file

    art = served_copy(tiny_artifact, tmp_path / "art")
    table = json.loads((art / "latency" / "synthetic-cpu.json").read_text())
    table.update(target="int8-cpu", device={"cpu": "test", "threads": 1, "batch": 1, "backend": "onnxruntime",
                                            "precision": "int8"},
                 timing=_FAST_TIMING, entries={k: 100 * v for k, v in table["entries"].items()},
                 references=[{**r, "ms": 20.0} for r in table["references"]])
    add_file(art, "latency/int8-cpu.json", json.dumps(table))
    out = tmp_path / "report"
    r = _run(["report", "--artifact", str(art), "--target", "int8-cpu", "--out", str(out), "--budgets", "2",
              "--baseline", "0.5", "--baseline-epochs", "0.1", _NOISY_OK, "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    (base,) = report["baselines"]
    assert base["name"] == "mobilenet_v3_small x0.5" and base["latency_ms"] > 0 and base["training"]["steps"] >= 1
    assert 0 <= base["test_accuracy"] <= 100 and 0 <= base["test_accuracy_fp32"] <= 100
    import onnx  # the baseline timed and tested is its own quantized file, not one quantized from random weights

    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out / base["file"])).graph.node)
    for s in report["served"]:
        assert set(s["files"]) == {"safetensors", "onnx_int8"} and s["measured_latency_ms"] > 0
        assert 0 <= s["test_accuracy"] <= 100 and 0 <= s["test_accuracy_fp32"] <= 100
    # the baseline's latency is a budget of its own: served or, if no subnet is that fast, said so
    labels = [s["label"] for s in report["served"]] + [u["label"] for u in report["unmet"]]
    assert labels == ["tight", "loose", "=mobilenet_v3_small x0.5"]
    md = (out / "report.md").read_text()
    assert "↳ baseline" in md and "mobilenet_v3_small x0.5's latency" in md and "the BN-re-calibrated int8 file" in md
    # the budget is the baseline's time now (the search knows the speed now); the verdict compares one timing
    assert base["budget_ms"] > 0 and "one interleaved timing of both" in md
    assert ("timed in the same passes" in md) == any(s["label"].startswith("=") for s in report["served"])
    # the references run far faster than "profiled" (at 20 ms)
    assert Speed.from_dict(report["reference"]["speed_before"]).apply(20.0) < 10
    # the synthetic table's numbers are not timings: the report must say the latency is off, and why
    assert "Not within" in md and "the table's own error" in md


def test_report_names_what_is_missing(tiny_artifact, tmp_path, capsys):
    assert main(["report", "--artifact", str(tiny_artifact), "--target", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "target 'nope' has no latency table" in err and "ofa profile" in err
    art = served_copy(tiny_artifact, tmp_path / "art")
    (art / "accuracy_predictor.safetensors").unlink()
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["files"]["accuracy_predictor.safetensors"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", "--artifact", str(art), "--target", "synthetic-cpu", "--out", str(tmp_path)]) == 2
    assert "ofa predictors" in capsys.readouterr().err


def test_the_latency_lines_tell_the_table_from_the_machine():
    from ofa.jobs.render import _accuracy_checks, _latency_checks

    served = [{"label": label, "id": label, "test_accuracy": 80.0, "val_accuracy": 80.1, "predicted_accuracy": 80.2,
               "measured_latency_ms": ms, "predicted_latency_ms": 2.2, "raw_predicted_latency_ms": 2.0,
               "drift_adjusted_error": ms / 2.3 - 1} for label, ms in (("tight", 2.3), ("loose", 2.8))]
    report = {"served": served, "tolerances": {"accuracy_points": 1.0, "latency_relative": 0.1},
              "accuracy_predictor": {"family": "ridge-3", "train_samples": 10, "test_samples": 3, "test": {}},
              "table_fit": {"quality": {"held_out": {"subnets": 20, "within_10pct": 0.95, "mean_abs_rel_error": 0.03}}},
              "val_images": 100,
              "reference": {"subnets": 10, "speed_before": {"scale": 1.1}, "speed_after": {"scale": 1.15},
                            "ratios_before": [1.1],
                            "ratios_after": [1.15], "repeatability": {"verdict": "the two halves of the rounds agree"}}}
    accuracy, latency = _accuracy_checks(report), _latency_checks(report)
    assert accuracy == ["Accuracy: 2 of 2 served subnets measured within 1 point of the prediction on the test split."]
    assert latency[0].startswith("Latency: 1 of 2 measured within 10% of the prediction the server made")
    assert latency[1] == "Raw, the table as profiled (no recalibration): 0 of 2 within 10% (+15.0% to +40.0%)."
    assert "ran at x1.100 of their profiled time before the searches and x1.150 while" in latency[2]
    assert "+0.0% to +21.7%" in latency[2] and "20 held-out subnets when profiled: 95% within 10%" in latency[2]
    assert latency[3].startswith("Not within: loose.")
    # the references timed with the served subnets ran at another speed than before the searches: said
    from ofa.jobs.report import speed_change

    assert speed_change([1.1, 1.0], [1.15, 1.02]) == {"speed_change": pytest.approx(1.0327, abs=1e-4),
                                                     "speed_changed": False}
    report["reference"].update(speed_change([1.1, 1.0, 1.2], [2.2, 1.9, 2.5]))
    assert report["reference"]["speed_changed"] and len(_latency_checks(report)) == 5
    assert _latency_checks(report)[3].startswith("**SPEED CHANGED**: the references took x2.000 as long while")
    # and what the answers themselves said: the speed sent was timed in passes far apart
    served[1]["speed_spread"] = 0.312
    lines = _latency_checks(report)
    assert len(lines) == 6 and lines[3] == ("**SPEED UNSETTLED**: the answers for loose said the passes that timed the "
                                            "speed sent lay up to 31.2% apart, more than 5%: the client was told their "
                                            "latency may be off by about as much.")


def test_the_accuracy_lines_say_how_many_the_intervals_expected_within_the_tolerance():
    from ofa.jobs.render import _accuracy_checks

    # a 90% half-width of 1.6449 states a sigma of 1 point: within 1 point 68.3% of the time, 1.37 of 2
    served = [{"label": label, "id": label, "test_accuracy": test, "val_accuracy": 80.0, "predicted_accuracy": 80.0,
               "predicted_accuracy_low": 80.0 - 1.6449, "predicted_accuracy_high": 80.0 + 1.6449,
               "interval_level": 0.9, "measured_accuracy": None} for label, test in (("tight", 79.5), ("loose", 81.5))]
    report = {"served": served, "tolerances": {"accuracy_points": 1.0, "latency_relative": 0.1}, "val_images": 100,
              "accuracy_predictor": {"family": "ridge-3", "train_samples": 10, "test_samples": 3, "test": {}}}
    lines = _accuracy_checks(report)
    assert lines[0] == "Accuracy: 1 of 2 served subnets measured within 1 point of the prediction on the test split."
    assert lines[1].startswith("Intervals: 2 of 2 test accuracies inside their 90% interval (half-widths 1.64, 1.64 "
                               "points; at those widths about 1.4 of 2 were to be expected within 1 point)")
    # a third budget that got the tight one's subnet: one measurement, counted once, and said
    report["served"] = served + [{**served[0], "label": "middle"}]
    lines = _accuracy_checks(report)
    assert lines[0] == ("Accuracy: 1 of 2 served subnets measured within 1 point of the prediction on the test "
                        "split. Budgets that got a subnet served already, counted once: middle (= tight).")
    assert lines[1].startswith("Intervals: 2 of 2 test accuracies")


def test_budgets_from_a_narrow_front_stay_at_or_above_its_fastest_point():
    from ofa.jobs.report import budgets_from_front

    front = [0.27814, 0.27861, 0.2791]  # rounded to 3 decimals, the tight budget fell below 0.27814
    budgets = [b for _, b in budgets_from_front(front, 3)]
    assert all(min(front) <= b <= max(front) + 1e-4 for b in budgets) and budgets == sorted(budgets)


def _rendered(device: dict, baseline: dict | None = None, **changes) -> str:
    """report.md of a made-up report: two served subnets, an optional baseline at the loose one's latency."""
    from ofa.jobs.render import render_markdown

    served = [{"label": label, "id": label, "arch": {"resolution": 28}, "budget_ms": budget, "macs": 2e6,
               "params": 1e5, "size_bytes": 4096, "search_seconds": 0.2, "predicted_accuracy": 80.0,
               "val_accuracy": 81.0, "test_accuracy": 78.0, "predicted_latency_ms": ms, "measured_latency_ms": ms,
               "raw_predicted_latency_ms": ms, "drift_adjusted_error": 0.0}
              for label, budget, ms in (("tight", 2.3449, 2.343), ("=mobilenet_v3_small x0.5", 3.0, 2.99))]
    report = {"space": "s", "target": "t", "artifact": "a", "digest": "d" * 64, "dataset": "fashion_mnist",
              "created": "now", "device": {"cpu": "c", "threads": 2, "batch": 1, **device}, "served": served,
              "accuracy_predictor": {"family": "ridge-3", "train_samples": 10, "test_samples": 3, "test": {},
                                     "shift": {"offset": -1.0}},
              "test_images": 5000, "val_images": 100, "tolerances": {"accuracy_points": 1.0, "latency_relative": 0.1},
              "table_fit": None, "unmet": [], "baselines": [], "baseline_epochs": None,
              "reference": {"subnets": 10, "speed_before": {"scale": 1.0}, "speed_after": {"scale": 1.0},
                            "ratios_before": [1.0], "ratios_after": [1.0], "repeatability": {"verdict": "agree"}}}
    if baseline is not None:
        report.update(baselines=[{"name": "mobilenet_v3_small x0.5", "resolution": 28, "test_accuracy": 70.0,
                                  "latency_ms": 3.0, "budget_ms": 3.0, "macs": 1e6, "params": 4e5,
                                  "size_bytes": 2048, **baseline}], baseline_epochs=0.5)
    return render_markdown({**report, **changes})


def test_report_md_says_what_was_measured_on_each_kind_of_target():
    # the predictor adds its validation-to-test shift (-1.00): a validation prediction of 81.00, measured 81.00
    md = _rendered({"backend": "onnxruntime"})
    assert "the fit (without the shift) was off by 0.00 points on average against the validation split" in md
    assert "(onnxruntime, the table's threads" in md and "fetched as BN-re-calibrated safetensors" in md
    assert "| tight | 2.345 |" in md  # a budget as precise as the prediction beside it (2.343 ms), never "2.34"
    assert "(openvino, the table's threads" in _rendered({"backend": "openvino"})
    assert "(torch eager, the table's threads" in _rendered({"backend": "torch"})
    int8 = _rendered({"backend": "onnxruntime", "precision": "int8"})
    assert "the BN-re-calibrated int8 file the target runs" in int8 and "and the int8 drop measured" in int8
    # a baseline: the clauses hold for the run at hand (grey images, epochs from the training or the flag)
    grey = _rendered({"backend": "onnxruntime"}, {"in_channels": 1}, baseline_epochs_given=False)
    assert "as shipped but its input conv, for 1-channel images" in grey and "(all phases of the supernet's" in grey
    assert "latency as timed here just before the searches" in grey and "in the table's units" not in grey
    assert "(2.990 ms, 0.3% faster, timed in the same passes) beats it" in grey
    rgb = _rendered({"backend": "onnxruntime"}, {"in_channels": 3}, baseline_epochs_given=True)
    assert "as shipped, trained from scratch" in rgb and "all phases" not in rgb


def test_a_demo_reuses_a_table_only_if_profiled_as_it_would_profile(tiny_artifact, tmp_path):
    """A table under the demo's target name profiled at int8, or channels_last, is not "already profiled"."""
    from ofa.artifact import add_file, load_artifact
    from ofa.jobs.demo import _profiled_before
    from ofa.predict.timing import Timing

    art = served_copy(tiny_artifact, tmp_path / "art")
    table = json.loads((art / "latency" / "synthetic-cpu.json").read_text())
    timing = Timing(backend="onnxruntime", threads=2)

    def reused(**device) -> bool:
        add_file(art, "latency/synthetic-cpu.json", json.dumps({
            **table, "timing": timing.protocol(), "fit": {"subnets": 2, "held_out": 10},
            "device": {**table["device"], "backend": "onnxruntime", "threads": 2, "batch": 1, **device}}))
        return _profiled_before(load_artifact(art), "synthetic-cpu", timing, 2) is not None

    assert reused() and reused(precision="fp32", memory_format="nchw")
    assert not reused(precision="int8") and not reused(memory_format="channels_last") and not reused(threads=1)
