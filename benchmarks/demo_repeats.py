"""Repeated fresh demo runs: are the served subnets' predictions right on every run, not on a lucky one?

Runs ``ofa demo --seed N`` for ``--runs`` seeds, each into a fresh folder (training, profile,
predictors, closed loop, serve, search, fetch, measure), then, with ``--load N`` (default 2), the
demo's last step again (``ofa report`` on that run's artifact) with N busy loops at nice 10 beside it,
as a shared machine looks. From every ``report.json`` it counts, over all served subnets:

- accuracy: the share within 1 point of the prediction on the test split, and the share of test
  accuracies inside the stated interval (its coverage, against its stated level);
- latency: the share within 10% of the prediction the server made at the speed it was told (apart,
  the answers that said their speed was unsettled, and the runs whose report said the machine's
  speed changed between the searches and the measurement), and of the table's raw prediction (no
  recalibration); the same under load;

with each run's figures beside them (the spread); runs of earlier invocations into the same folder
count too (``seed-N/repeat.json``). A step the timing protocol calls too noisy makes the demo refuse:
the script says so and runs it again once (the demo reuses its finished steps); a loaded report refused
that way is run again with ``--accept-noisy-timing`` and counted as untrusted.

    python benchmarks/demo_repeats.py --runs 5 --out runs/repeats [--first-seed 1] [--load 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ofa.jobs.render import distinct_served
from ofa.predict.interval import share_within
from ofa_client.values import SPEED_TOLERANCE

from common import ROOT, busy_loops, fingerprint

OFA = str(ROOT / ".venv" / "bin" / "ofa")


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def _twice(cmd: list[str], log: Path, what: str) -> tuple[int, float]:
    rc, s = _run(cmd, log)
    if rc != 0:
        print(f"  {what} exited with {rc} after {s / 60:.1f} min (see {log}); running it again once")
        rc, s2 = _run(cmd, log)
        s += s2
    return rc, s


def served_rows(report: dict) -> list[dict]:
    """The figures of each served subnet that the goals are about."""
    rows = []
    shift = (report["accuracy_predictor"].get("shift") or {}).get("offset")  # the served prediction adds it
    for s in distinct_served(report):  # two budgets that got one subnet: one measurement
        low, high = s.get("predicted_accuracy_low"), s.get("predicted_accuracy_high")
        val = s.get("val_accuracy")
        rows.append({"label": s["label"], "predicted_accuracy": s["predicted_accuracy"],
                     "test_accuracy": s["test_accuracy"], "val_accuracy": val, "shift_offset": shift,
                     "accuracy_error": s["test_accuracy"] - s["predicted_accuracy"],
                     "validation_error": None if val is None else val - (s["predicted_accuracy"] - (shift or 0.0)),
                     "inside_interval": None if low is None else bool(low <= s["test_accuracy"] <= high),
                     "half_width": None if low is None else (high - low) / 2,
                     "interval_level": s.get("interval_level"), "extrapolated": s.get("extrapolated"),
                     "latency_error": s["measured_latency_ms"] / s["predicted_latency_ms"] - 1,
                     "raw_latency_error": s["measured_latency_ms"] / s["raw_predicted_latency_ms"] - 1,
                     "speed_spread": s.get("speed_spread"),
                     "speed_changed": report["reference"].get("speed_changed")})
    return rows


def shares(rows: list[dict], key: str, tol: float) -> str:
    err = np.array([r[key] for r in rows])
    if not len(err):
        return "none"
    return (f"{np.mean(np.abs(err) <= tol):.0%} ({int(np.sum(np.abs(err) <= tol))} of {len(err)}); "
            f"errors {err.min():+.3g} to {err.max():+.3g}, mean |error| {np.abs(err).mean():.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=1)
    p.add_argument("--out", default="runs/repeats", help="a folder of its own per run goes in here")
    p.add_argument("--load", type=int, default=2, help="busy loops beside the loaded report (0: none)")
    p.add_argument("--demo-args", default="", help="more arguments for ofa demo, as one string")
    args = p.parse_args()
    print(fingerprint(), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(args.first_seed, args.first_seed + args.runs):
        d = out / f"seed-{seed}"
        rc, secs = _twice([OFA, "demo", "--out", str(d), "--seed", str(seed), "--no-progress",
                           *args.demo_args.split()], out / f"seed-{seed}.log", f"demo seed {seed}")
        run = {"seed": seed, "exit_code": rc, "minutes": round(secs / 60, 1)}
        if rc == 0:
            report = json.loads((d / "report.json").read_text())
            run["served"] = served_rows(report)
            run["untrusted"] = report["reference"].get("untrusted_timings", [])
            run["steps_seconds"] = report.get("steps_seconds")
        if rc == 0 and args.load:
            cmd = [OFA, "report", "--artifact", str(d / "supernet"), "--target", "this-machine",
                   "--out", str(d / "loaded"), "--no-progress"]
            with busy_loops(args.load):
                lrc, _ = _run(cmd, out / f"seed-{seed}-loaded.log")
                run["loaded_untrusted"] = lrc != 0
                if lrc != 0:
                    print(f"  the loaded report refused its timing (exit {lrc}); again, accepting it labelled")
                    lrc, _ = _run([*cmd, "--accept-noisy-timing"], out / f"seed-{seed}-loaded.log")
            if lrc == 0:
                run["loaded"] = served_rows(json.loads((d / "loaded" / "report.json").read_text()))
        d.mkdir(parents=True, exist_ok=True)
        (d / "repeat.json").write_text(json.dumps(run, indent=1))
        served = run.get("served", [])
        print(f"seed {seed}: exit {rc}, {run['minutes']} min; "
              + "; ".join(f"{r['label']} acc {r['predicted_accuracy']:.2f}->{r['test_accuracy']:.2f} "
                          f"({'in' if r['inside_interval'] else 'OUT of'} +/-{r['half_width'] or 0:.2f}) "
                          f"lat {r['latency_error']:+.1%} raw {r['raw_latency_error']:+.1%}" for r in served)
              + ("; loaded lat " + ", ".join(f"{r['latency_error']:+.1%}" for r in run["loaded"])
                 if run.get("loaded") else ""), flush=True)
    # every run in the folder, also those of an earlier invocation (seeds run in parts)
    runs = [json.loads(f.read_text()) for f in sorted(out.glob("seed-*/repeat.json"))]
    (out / "summary.json").write_text(json.dumps({"fingerprint": fingerprint(), "runs": runs}, indent=1))
    rows = [r for run in runs for r in run.get("served", [])]
    loaded = [r for run in runs for r in run.get("loaded", [])]
    with_iv = [r for r in rows if r["inside_interval"] is not None]
    print(f"\n{sum(run['exit_code'] == 0 for run in runs)} of {len(runs)} demo runs finished; "
          f"{len(rows)} served subnets")
    print(f"accuracy within 1 point (test):      {shares(rows, 'accuracy_error', 1.0)}")
    with_val = [r for r in rows if r["validation_error"] is not None]
    print(f"  the validation prediction (less the shift) against validation: "
          f"{shares(with_val, 'validation_error', 1.0)}")
    if with_iv:
        print(f"interval coverage (test):             {np.mean([r['inside_interval'] for r in with_iv]):.0%} "
              f"({sum(r['inside_interval'] for r in with_iv)} of {len(with_iv)}) at stated level "
              f"{with_iv[0]['interval_level']:.0%}; half-widths {min(r['half_width'] for r in with_iv):.2f}-"
              f"{max(r['half_width'] for r in with_iv):.2f} points; extrapolated picks "
              f"{sum(bool(r['extrapolated']) for r in with_iv)}")
        expected = sum(share_within(r["half_width"], r["interval_level"], 1.0) for r in with_iv)
        print(f"  within 1 point, as the intervals state it: {expected:.1f} of {len(with_iv)} expected, "
              f"{sum(abs(r['accuracy_error']) <= 1.0 for r in with_iv)} measured")
    print(f"latency within 10% (served):         {shares(rows, 'latency_error', 0.10)}")
    print(f"latency within 10% (raw table):      {shares(rows, 'raw_latency_error', 0.10)}")
    unsettled = [r for r in rows if (r.get("speed_spread") or 0) > SPEED_TOLERANCE]
    print(f"  of them, answers that said SPEED UNSETTLED (passes > {SPEED_TOLERANCE:.0%} apart): "
          f"{shares(unsettled, 'latency_error', 0.10)}; the others: "
          f"{shares([r for r in rows if r not in unsettled], 'latency_error', 0.10)}")
    changed = [r for r in rows if r.get("speed_changed")]
    print(f"  of them, in runs whose report said SPEED CHANGED (references > {SPEED_TOLERANCE:.0%} apart before "
          f"and after): {shares(changed, 'latency_error', 0.10)}; the others: "
          f"{shares([r for r in rows if r not in changed], 'latency_error', 0.10)}")
    if args.load:
        print(f"latency within 10% ({args.load} busy loops):    {shares(loaded, 'latency_error', 0.10)}; "
              f"timings refused as too noisy in {sum(bool(run.get('loaded_untrusted')) for run in runs)} runs")
    print(f"per run minutes: {[run['minutes'] for run in runs]}")


if __name__ == "__main__":
    sys.exit(main())
