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

from conftest import served_copy, tiny_args

from ofa.cli import main

_FAST_TIMING = ["--latency-runs", "1", "--min-run-time", "0.01", "--no-progress"]


def _run(args, tmp_path):
    env = {**os.environ, "OFA_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "ofa", *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_budget(tiny_data, tmp_path):
    out = tmp_path / "demo"
    sets = [x for a in tiny_args(tiny_data) for x in ("--set", a)]
    r = _run(["demo", "--out", str(out), *sets, "--samples", "12", "--profile-rounds", "1",
              "--profile-min-run-time", "0.001", "--profile-calibrate", "0", *_FAST_TIMING], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("[1/5] train", "[2/5] measure", "[3/5] profile", "[4/5] serve", "[5/5] report"):
        assert step in r.stdout
    assert "$ ofa-client search --target this-machine --max-latency-ms" in r.stdout
    assert "server stopped (exit code 0)" in r.stdout

    report = json.loads((out / "report.json").read_text())
    served = report["served"]
    assert [s["label"] for s in served] == ["tight", "middle", "loose"]
    budgets = [s["budget_ms"] for s in served]
    assert budgets == sorted(budgets) and len(set(budgets)) == 3
    for s in served:
        assert s["predicted_latency_ms"] <= s["budget_ms"]
        data = (out / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["size_bytes"]
        assert 0 <= s["test_accuracy"] <= 100 and s["measured_latency_ms"] > 0
    assert report["health"] == "SERVING"
    # --profile-calibrate 0: the reference is the one subnet timed end to end, and was timed again
    assert report["reference"]["subnets"] == 1 and report["reference"]["ratios"] == [report["reference"]["speed_ratio"]]
    assert set(report["steps_seconds"]) >= {"train", "predictors", "profile", "total"}
    md = (out / "report.md").read_text()
    assert md.count("| `") == 3 and "![Pareto front](pareto.png)" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stopped" in (out / "server.log").read_text()  # SIGTERM, graceful

    # a second run reuses the trained supernet and the measured subnets
    r = _run(["demo", "--out", str(out), *sets, "--samples", "12", "--profile-rounds", "1",
              "--profile-min-run-time", "0.001", "--profile-calibrate", "0", *_FAST_TIMING], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already trained: reusing it" in r.stdout
    # other training settings into the same folder are refused, not served from the old supernet
    r = _run(["demo", "--out", str(out), *sets, "--set", "seed=5", *_FAST_TIMING], tmp_path)
    assert r.returncode == 2 and "trained with different values of ['seed']" in r.stderr, r.stderr[-3000:]


def test_demo_refuses_bad_numbers_before_any_work(tmp_path, capsys):
    for flag, value in (("--samples", "5"), ("--budgets", "0"), ("--profile-rounds", "0"),
                        ("--profile-min-run-time", "0"), ("--profile-calibrate", "-1"), ("--latency-runs", "0"),
                        ("--min-run-time", "0")):
        assert main(["demo", "--out", str(tmp_path / "demo"), flag, value, "--no-progress"]) == 2
        assert f"{flag} must be" in capsys.readouterr().err  # the message names the flag given
    assert not (tmp_path / "demo").exists()


def test_report_with_a_baseline(tiny_artifact, tmp_path):
    from ofa.artifact import add_file

    art = served_copy(tiny_artifact, tmp_path / "art")
    # a table 100 times too slow: the report must find the latency off whatever this machine's speed
    table = json.loads((art / "latency" / "synthetic-cpu.json").read_text())
    add_file(art, "latency/synthetic-cpu.json",
             json.dumps({**table, "entries": {k: 100 * v for k, v in table["entries"].items()}}))
    out = tmp_path / "report"
    r = _run(["report", "--artifact", str(art), "--target", "synthetic-cpu", "--out", str(out), "--budgets", "2",
              "--baseline", "0.5", "--baseline-epochs", "0.1", *_FAST_TIMING], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    (base,) = report["baselines"]
    assert base["name"] == "mobilenet_v3_small x0.5" and base["latency_ms"] > 0 and base["training"]["steps"] >= 1
    # the baseline's latency is a budget of its own: served or, if no subnet is that fast, said so
    labels = [s["label"] for s in report["served"]] + [u["label"] for u in report["unmet"]]
    assert labels == ["tight", "loose", "=mobilenet_v3_small x0.5"]
    md = (out / "report.md").read_text()
    assert "↳ baseline" in md and "mobilenet_v3_small x0.5's latency" in md
    # the budget is the baseline's time in the table's units; the verdict compares one timing of both
    assert base["budget_ms"] > 0 and "one interleaved timing of both" in md
    assert ("timed in the same passes" in md) == any(s["label"].startswith("=") for s in report["served"])
    # the synthetic table's numbers are not timings: the report must say the latency is off, and why
    assert "Not within" in md and "per-block sum" in md


def test_report_names_what_is_missing(tiny_artifact, tmp_path, capsys):
    assert main(["report", "--artifact", str(tiny_artifact), "--target", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--target 'nope' has no latency table" in err and "ofa profile" in err
    art = served_copy(tiny_artifact, tmp_path / "art")
    (art / "accuracy_predictor.safetensors").unlink()
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["files"]["accuracy_predictor.safetensors"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", "--artifact", str(art), "--target", "synthetic-cpu", "--out", str(tmp_path)]) == 2
    assert "ofa predictors" in capsys.readouterr().err


def test_the_drift_line_takes_the_median_of_the_reference_subnets():
    from ofa.report import _checks, speed_ratio

    ratios, median = speed_ratio([2.6, 2.2, 1.09], [2.0, 2.0, 1.0])
    assert ratios == pytest.approx([1.3, 1.1, 1.09]) and median == pytest.approx(1.1)  # the mean is 1.163

    served = [{"label": label, "test_accuracy": 80.0, "val_accuracy": 80.1, "predicted_accuracy": 80.2,
               "measured_latency_ms": ms, "predicted_latency_ms": 2.0, "drift_adjusted_error": ms / 2.2 - 1}
              for label, ms in (("tight", 2.3), ("loose", 2.1))]
    report = {"served": served, "tolerances": {"accuracy_points": 1.0, "latency_relative": 0.1},
              "accuracy_predictor": {"family": "ridge-3", "train_samples": 10, "test_samples": 3, "test": {}},
              "table_check": {}, "val_images": 100,
              "reference": {"arch_id": "ab12", "profiled_ms": 2.0, "now_ms": 2.6, "subnets": 3,
                            "ratios": [1.3, 1.1, 1.09], "speed_ratio": 1.1}}
    accuracy, latency = _checks(report)
    assert accuracy == ["Accuracy: 2 of 2 served subnets measured within 1 point of the prediction on the test split."]
    drift = latency[-1]
    assert "the 3 subnets the table timed end to end run ×1.300, ×1.100, ×1.090 now, median ×1.100" in drift
    assert "2.000 ms when profiled and 2.600 ms now" in drift and "(2 of 2 within 10%)" in drift
