"""``ofa demo``: the whole story on this machine, from nothing to three specialised subnets.

1. train the ``quick`` supernet (progressive shrinking with distillation) into OUT/supernet;
2. profile this machine as a latency target (onnxruntime by default: how a subnet fetched as
   ONNX runs);
3. measure subnets (some along that target's latency front, where the search will pick from)
   and fit the accuracy predictor into it; then the closed loop: measure the subnets the
   search would serve for a spread of budgets, refit, until they agree with their intervals;
4. start ``ofa serve`` on loopback and, with ``ofa-client``, request and fetch the best
   subnet for a tight, a middle and a loose latency budget; stop the server;
5. measure the served subnets (test accuracy, latency here) and write OUT/report.md,
   OUT/report.json and OUT/pareto.png.

Every step that has finished before is reused when the demo runs again into the same
folder (training resumes from its last checkpoint; measured subnets are kept).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..artifact import CHECKPOINTS, MANIFEST, add_file, latency_file, load_artifact
from ..predict.timing import Timing
from .report import Report, check_report_settings, run_report, write_report

__all__ = ["check_demo", "run_demo"]

Log = Callable[[str], None]


def check_demo(samples: int = 40, target: str = "this-machine", timing: Timing = Timing(), profile_subnets: int = 50,
               budgets: int = 3, front: int = 16, families: Sequence[str] | None = None, loop_rounds: int = 2,
               loop_budgets: int = 5) -> None:
    """Refuse what :func:`run_demo` could only fail on later (step 4 starts after ~10 minutes), naming the field."""
    from ..predict.latency import check_target_name
    from ..predict.profile import check_profile
    from .predictors import check_predictor_settings

    check_target_name(target)
    check_predictor_settings(samples, front=front, families=families, loop_rounds=loop_rounds,
                             loop_budgets=loop_budgets, front_target=target)
    timing.check()
    try:
        check_profile(profile_subnets)
    except ValueError as e:
        raise ValueError(f"profile_{e}") from None
    check_report_settings(budgets)


def _profiled_before(art, target: str, timing: Timing, subnets: int) -> dict[str, Any] | None:
    """The artifact's table of ``target`` if it was profiled with exactly these settings (else None)."""
    from ..predict.latency import LatencyTableError, validate_table
    from ..predict.profile import timing_of_table

    if not art.files.has(latency_file(target)):
        return None
    try:
        table = validate_table(art.files.read_json(latency_file(target)), art.space)
    except (OSError, ValueError, LatencyTableError):
        return None
    try:  # its device and protocol read as every other reader of a table reads them
        same = timing_of_table(table, seed=timing.seed) == timing
    except ValueError:  # a backend this package cannot run: not one this demo would profile with
        return None
    fit, protocol = table.get("fit") or {}, table.get("timing") or {}
    return table if same and {k: protocol.get(k) for k in timing.protocol()} == timing.protocol() and \
        fit.get("subnets", 0) + fit.get("held_out", 0) == subnets + 10 else None


def _train_step(art_dir: Path, preset: str, config, progress: bool, log: Log) -> None:
    """Step 1: train into ``art_dir``, resume a killed run, or reuse a finished one trained the same way."""
    from ..train import config_differences, train
    from ..train.checkpoint import has_checkpoint

    if (art_dir / MANIFEST).exists():
        trained = json.loads((art_dir / MANIFEST).read_text()).get("training", {})
        diff = config_differences(trained, json.loads(json.dumps(config.to_dict())))
        if diff:
            raise ValueError(f"{art_dir} was trained with different values of {diff} than preset {preset!r} "
                             f"and the assignments give; use another output folder, or delete {art_dir} to train "
                             f"it again")
        log("  already trained: reusing it (delete the folder to train again)")
        return
    resume = has_checkpoint(art_dir / CHECKPOINTS)
    if resume:
        log("  resuming from its last checkpoint")
    results = train(config, art_dir, resume=resume, progress=progress)
    last = results[config.phases[-1].name]
    log("  validation accuracy after the last phase: " + ", ".join(f"{k} {v:.2f}%" for k, v in sorted(last.items())))


def _profile_step(art_dir: Path, target: str, timing: Timing, subnets: int, progress: bool, log: Log) -> None:
    """Step 2: this machine's latency table of ``target`` in the artifact (reused if profiled the same way)."""
    from ..predict.latency import validate_table
    from ..predict.profile import profile_space

    art = load_artifact(art_dir)
    table = _profiled_before(art, target, timing, subnets)
    if table is not None:
        log("  already profiled with these settings: reusing the table (the report re-times its references, "
            "so the machine's speed now is measured anyway)")
    else:
        table = profile_space(art.space, target, timing, subnets=subnets, progress=progress)
        add_file(art_dir, latency_file(target), json.dumps(validate_table(table, art.space), indent=1,
                                                           sort_keys=True))
    held = table["fit"]["quality"].get("held_out") or {}
    log(f"  {len(table['entries'])} blocks and {table['fit']['subnets'] + table['fit']['held_out']} subnets timed "
        f"in {table['profile_seconds']} s ({timing.backend}); model {table['model']['family']}, on "
        f"{held.get('subnets', 0)} held-out subnets {held.get('within_10pct', float('nan')):.0%} within 10%, "
        f"mean |error| {held.get('mean_abs_rel_error', float('nan')):.1%}; "
        f"{table['timing']['repeatability']['verdict']}")


def run_demo(out: str | Path, preset: str = "quick", assignments: Sequence[str] = (), samples: int = 40,
             target: str = "this-machine", timing: Timing = Timing(), profile_subnets: int = 50, budgets: int = 3,
             front: int = 16, progress: bool = True, log: Log = lambda s: None,
             command: str | None = None, families: Sequence[str] | None = None, loop_rounds: int = 2,
             loop_budgets: int = 5, seed: int = 0, accept_noisy: bool = False) -> Report:
    """Run the five steps into ``out``; returns the report (also written as OUT/report.json, its markdown
    naming ``command``). ``seed`` seeds the training (its split too) and the predictor's samples."""
    from ..train import load_config
    from .predictors import build_accuracy_predictor

    check_demo(samples, target, timing, profile_subnets, budgets, front, families, loop_rounds, loop_budgets)
    out = Path(out)
    art_dir = out / "supernet"
    config = load_config(preset, None, [f"seed={seed}", *assignments])
    steps: dict[str, float] = {}
    t_all = t = time.perf_counter()
    log(f"[1/5] train the {preset!r} supernet into {art_dir}")
    _train_step(art_dir, preset, config, progress, log)
    steps["train"], t = time.perf_counter() - t, time.perf_counter()
    log(f"[2/5] profile this machine as target {target!r}")
    _profile_step(art_dir, target, timing, profile_subnets, progress, log)
    steps["profile"], t = time.perf_counter() - t, time.perf_counter()
    log(f"[3/5] measure {samples} subnets ({front} of them along the latency front of {target!r}, where the "
        f"search picks from), fit the accuracy predictor, then measure what the search would serve and refit "
        f"(closed loop, at most {loop_rounds} rounds of {loop_budgets} budgets)")
    rep = build_accuracy_predictor(art_dir, samples=samples, seed=seed, front=front, front_target=target,
                                   families=families, loop_rounds=loop_rounds, loop_budgets=loop_budgets,
                                   progress=progress, log=lambda s: log("  " + s))
    steps["predictors"], t = time.perf_counter() - t, time.perf_counter()
    log(f"[4/5] serve it and ask ofa-client for {budgets} latency budgets")
    report = run_report(art_dir, target, out, budgets=budgets, progress=progress, log=log, accept_noisy=accept_noisy)
    steps["serve, search, fetch and measure"] = time.perf_counter() - t
    steps["total"] = time.perf_counter() - t_all
    log("[5/5] report")
    report["steps_seconds"] = {k: round(v, 1) for k, v in steps.items()}
    report["predictor_fit"] = {k: rep.get(k) for k in ("selected", "test", "train_samples", "test_samples",
                                                       "closed_loop")}
    write_report(report, out, command)
    return report
