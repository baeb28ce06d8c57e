"""Specialise an artifact for several latency budgets through the real service, then measure what came back.

``ofa report`` (and the last step of ``ofa demo``) starts ``ofa serve`` on 127.0.0.1
with an OS-chosen port, asks it through the ``ofa-client`` CLI for the Pareto front
and for the best subnet under each latency budget, fetches each subnet's weights
(sha256-verified by the client), and stops the server. Then it measures every served
subnet on this machine: accuracy on the test split (and on the validation split the
predictor was fitted to) and end-to-end latency timed the way the latency table was
profiled. With ``baselines``, torchvision's ``mobilenet_v3_small`` at the given width
multipliers is trained from scratch on the same data for the same number of epochs
and measured the same way; each baseline's measured latency is added as a budget, so
every baseline meets a subnet served for exactly its latency.

Writes ``report.md``, ``report.json``, ``pareto.png``, ``server.log`` and
``subnets/*.safetensors`` into the output folder.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypedDict

import numpy as np

from .._io import atomic_write_text
from ..artifact import ACCURACY_PREDICTOR, Artifact, latency_file
from ..predict.latency import SPEED_TOLERANCE
from .baselines import Baseline, train_baselines
from .service import ReportError, ServerProcess, ofa_client

__all__ = ["Report", "ReportError", "budgets_from_front", "check_report_settings", "run_report", "speed_change",
           "write_report"]

ACCURACY_TOLERANCE = 1.0   # points: a served subnet's test accuracy vs its prediction
LATENCY_TOLERANCE = 0.10   # relative: measured vs predicted latency
_LABELS = {1: ("middle",), 2: ("tight", "loose"), 3: ("tight", "middle", "loose"),
           5: ("tightest", "tight", "middle", "loose", "loosest")}
Log = Callable[[str], None]


class Report(TypedDict, total=False):
    """What :func:`run_report` returns and report.json holds (JSON values only: it is written as it is)."""

    artifact: str
    digest: str
    space: str
    dataset: str
    target: str
    device: dict[str, Any]  # the latency table's device: cpu, threads, batch, backend
    table_fit: dict[str, Any] | None  # the table's model quality when profiled
    reference: dict[str, Any]  # the references re-timed before the searches and with the served subnets, and how
    # far apart the two speeds were (speed_change, speed_changed)
    timing: dict[str, Any]  # the timing protocol
    accuracy_predictor: dict[str, Any]
    health: str
    front: list[dict[str, Any]]  # the Pareto front the server returned
    served: list[dict[str, Any]]  # per budget: the subnet as served, its files, and what was measured here
    unmet: list[dict[str, Any]]  # budgets no subnet meets (a baseline's latency)
    baselines: list[dict[str, Any]]
    baseline_epochs: float | None
    baseline_epochs_given: bool  # --baseline-epochs set them; else all phases of the supernet's training together
    test_images: int
    val_images: int
    tolerances: dict[str, float]
    created: str
    steps_seconds: dict[str, float]  # added by the demo
    predictor_fit: dict[str, Any]  # added by the demo


def check_report_settings(budgets: int = 1, budget_ms: Sequence[float] = ()) -> None:
    """Refuse a setting :func:`run_report` cannot use, naming the field."""
    if budgets < 1 and not budget_ms:
        raise ValueError(f"budgets must be >= 1, got {budgets}")
    if any(not b > 0 for b in budget_ms):
        raise ValueError(f"budget_ms values must be > 0, got {list(budget_ms)}")


def budgets_from_front(latencies: Sequence[float], n: int) -> list[tuple[str, float]]:
    """``n`` labelled latency budgets spread over the front's range (10% to 90% of the way)."""
    lo, hi = min(latencies), max(latencies)
    labels = _LABELS.get(n, tuple(f"budget-{i + 1}" for i in range(n)))
    fracs = [0.5] if n == 1 else np.linspace(0.1, 0.9, n)
    # rounded up: a budget at the front's fastest point stays at or above it (rounded down it fell below the
    # smallest achievable latency, and the search refused it)
    return [(label, math.ceil((lo + f * (hi - lo)) * 1e4) / 1e4) for label, f in zip(labels, fracs)]


@dataclass
class _Run:
    """What the steps of one report share: the artifact, its target's table and how it was timed."""

    art: Artifact
    target: str
    out: Path
    table: dict[str, Any]
    timing: Any  # ofa.predict.timing.Timing
    progress: bool
    log: Log
    refs: list = field(default_factory=list)  # (arch, profiled ms) of the table's reference subnets
    ref_parts: list = field(default_factory=list)
    base_parts: list = field(default_factory=list)
    accept_noisy: bool = False  # use a timing the protocol calls untrusted (labelled), instead of refusing
    untrusted: list = field(default_factory=list)  # which timings were used although untrusted
    exported: Path | None = None  # where the references' and baselines' ONNX exports are kept for every pass

    def time(self, parts: list, desc: str, passes: bool = False):
        """The parts timed until the protocol trusts the run (``passes``: in passes that agree on the machine's
        level, for the speed a search is sent); a run it never trusts refuses the report, or with
        ``accept_noisy`` is used and named in ``untrusted``."""
        from ..predict.timing import NoisyTiming, time_parts_agreed, time_parts_trusted

        try:
            return (time_parts_agreed if passes else time_parts_trusted)(
                self.art.space, parts, self.timing, self.progress, desc, say=lambda m: self.log("  " + m),
                exported=self.exported)
        except NoisyTiming as e:
            if not self.accept_noisy:
                raise NoisyTiming(f"{e}. The latency figures would not be trustworthy: run it again when the "
                                  f"machine is quieter (a demo reuses its finished steps)", e.timings) from None
            self.log(f"  USING AN UNTRUSTED TIMING (noisy timings accepted): {e}")
            self.untrusted.append(desc)
            return e.timings

    @property
    def profiled(self) -> np.ndarray:
        return np.array([ms for _, ms in self.refs])


def _open(artifact: Path, target: str, out: Path, progress: bool, log: Log) -> _Run:
    from ..artifact import load_artifact
    from ..predict.latency import LatencyPredictor, validate_table
    from ..predict.profile import timing_of_table
    from ..predict.timing import subnet_part

    art = load_artifact(artifact)
    if not art.files.has(latency_file(target)):
        raise ValueError(f"target {target!r} has no latency table in {artifact} (known: "
                         f"{sorted(art.files.latency_targets())}); profile it first (`ofa profile`)")
    if not art.files.has(ACCURACY_PREDICTOR):
        raise ValueError(f"{artifact} has no accuracy predictor; fit one first (`ofa predictors`)")
    table = validate_table(art.files.read_json(latency_file(target)), art.space)
    run = _Run(art, target, out, table, timing_of_table(table), progress, log)
    run.refs = LatencyPredictor(art.space, table).references
    run.ref_parts = [subnet_part(art.space, arch) for arch, _ in run.refs]
    return run


def _retime_references(run: _Run, bases: list[Baseline], timings_file: Path):
    """The steps of ``recalibrate()`` (the baselines timed in the same passes): the machine's speed now."""
    from ..predict.cost import count_macs_params
    from ..predict.profile import reference_timings, speed_of

    space, res = run.art.space, max(run.art.space.resolutions)
    run.log(f"  timing the table's {len(run.refs)} reference subnets here now ({run.timing.backend}, "
            f"{run.timing.threads} threads), as a device does before it asks")
    before = run.time(run.ref_parts + run.base_parts, "re-time references", passes=True)
    ratios, speed = speed_of([ms[: len(run.refs)] for ms in before.pass_ms()], run.profiled)
    recal = {**run.table, "recalibration": {**speed.to_dict(), "ratios": ratios}}
    timings_file.write_text(json.dumps(reference_timings(space, recal, before), indent=1))
    run.log(f"  this machine runs at {speed.describe()} of the time it took when profiled ({len(run.refs)} "
            f"references; {before.repeatability()['verdict']})")
    for b, ms in zip(bases, before.ms[len(run.refs):]):
        b.row["budget_ms"] = round(float(ms), 4)  # the search is told the speed now: a budget in today's ms
        b.row["macs"] = count_macs_params(b.module, (space.in_channels, res, res))[0]
    return ratios, speed


def _search_and_fetch(run: _Run, address: str, speed_args: tuple[str, ...], plan: list[tuple[str, float]]):
    """The best subnet under each budget of ``plan``, fetched; budgets no subnet meets (baselines'), apart."""
    from ..export import RECORDED, run_format  # torch: imported when a report runs, not when it is imported

    served, unmet = [], []
    for label, budget in plan:
        try:
            s = ofa_client(address, "search", *speed_args, "--max-latency-ms", f"{budget}", log=run.log)
        except ReportError as e:
            if e.exit_code != 3 or not label.startswith("="):  # 3: infeasible, expected only for baselines
                raise
            run.log(f"  no subnet meets {budget} ms: {e}")
            unmet.append({"label": label, "budget_ms": budget, "reason": str(e).split(": ", 1)[-1]})
            continue
        files = {}
        for fmt in dict.fromkeys((RECORDED, run_format(run.timing.backend, run.timing.precision))):  # + the one run
            path = run.out / "subnets" / f"{s['id']}.{fmt}"
            fetched = ofa_client(address, "fetch", "--arch", json.dumps(s), "--format", fmt, "--out", str(path),
                                 log=run.log)
            files[fmt] = {"file": str(path.relative_to(run.out)), "bytes": fetched["bytes"],
                          "sha256": fetched["sha256"]}
        served.append({"label": label, "budget_ms": budget, **s, "file": files[RECORDED]["file"],
                       "size_bytes": files[RECORDED]["bytes"], "sha256": files[RECORDED]["sha256"],
                       "files": files})
    return served, unmet


def _serve(run: _Run, bases: list[Baseline], budgets: int, budget_ms: Sequence[float]) -> dict[str, Any]:
    """Start ``ofa serve``, re-time the references, ask for the front and the budgets' subnets, stop it."""
    run.log(f"serving {run.art.path} (server log: {run.out / 'server.log'})")
    t_serve = time.perf_counter()
    timings_file = run.out / "reference-timings.json"
    speed_args = ("--target", run.target, "--reference-timings", str(timings_file))
    with ServerProcess([run.art.path], run.out / "server.log") as server:
        run.log(f"  ofa serve is listening on {server.address}")
        health = ofa_client(server.address, "health", log=run.log)["status"]
        # nothing is timed while the server (or the client just started) still works: on 2 cores that would
        # measure the server's start-up, not this machine (the references once ran x1.34 slow seconds after
        # the server started, x0.70 a minute later)
        run.log("  " + server.wait_idle())
        # as close to the searches and to the timing of what they return as can be: a shared machine changes
        # speed within a minute
        ratios, speed = _retime_references(run, bases, timings_file)
        front = ofa_client(server.address, "pareto", *speed_args, "--points", "10", log=run.log)
        spread = ([(f"budget-{i + 1}", float(b)) for i, b in enumerate(budget_ms)] if budget_ms else
                  budgets_from_front([s["predicted_latency_ms"] for s in front], budgets))
        plan = spread + [(f"={b.row['name']}", b.row["budget_ms"]) for b in bases]
        served, unmet = _search_and_fetch(run, server.address, speed_args, plan)
        code = server.stop()
    run.log(f"  server stopped (exit code {code}) after {time.perf_counter() - t_serve:.0f} s")
    return {"health": health, "front": front, "served": served, "unmet": unmet,
            "ratios_before": ratios, "speed_before": speed.to_dict()}


def _time_served(run: _Run, served: list[dict[str, Any]], bases: list[Baseline]) -> dict[str, Any]:
    """Latency of the files as fetched, in the same interleaved passes as the references and baselines."""
    from ..export import run_format
    from ..predict.latency import LatencyPredictor, Speed
    from ..predict.profile import speed_of
    from ..predict.timing import subnet_part

    space = run.art.space
    fmt = run_format(run.timing.backend, run.timing.precision)
    parts = [subnet_part(space, space.arch_from_json(json.dumps(s["arch"])), str(run.out / s["files"][fmt]["file"]))
             for s in served]
    after = run.time(parts + run.ref_parts + run.base_parts, "time served subnets")
    n, k = len(served), len(run.refs)
    ratios, speed = speed_of(after.ms[n : n + k], run.profiled, check=False)  # what was measured, said
    raw = LatencyPredictor(space, run.table).with_speed(Speed())
    for s, ms, arch_raw in zip(served, after.ms, raw(space.encode([p.arch for p in parts]))):
        s["measured_latency_ms"] = round(float(ms), 4)
        s["raw_predicted_latency_ms"] = round(float(arch_raw), 4)
        s["drift_adjusted_error"] = round(float(ms / speed.apply(arch_raw) - 1), 4)
    for b, ms in zip(bases, after.ms[n + k:]):
        b.row["latency_ms"] = round(float(ms), 4)
    return {"ratios_after": ratios, "speed_after": speed.to_dict(), "repeatability": after.repeatability()}


def _measure_accuracy(run: _Run, served: list[dict[str, Any]], bases: list[Baseline],
                      data_dir: str | None) -> tuple[int, int]:
    """Test (and validation) accuracy of the fetched files and the baselines; the two splits' sizes. Where the
    predictor measured the validation-to-test shift on half the test split, only the other half checks."""
    from ..data import load_dataset, split_test
    from ..evaluate import accuracy
    from ..export import FORMATS, RECORDED, run_format
    from ..predict.measure import validation_set

    training = run.art.manifest["training"]
    test, spec = load_dataset(training["dataset"], data_dir or training.get("data_dir") or None, False,
                              training.get("image_size", 224))
    if _predictor_quality(run.art)["shift"] is not None:
        test = split_test(test, training["seed"])[1]  # the evaluation half: no predictor measured it
    val, _ = validation_set(training, data_dir)
    # the file the target runs where its precision changes the network (int8), else the served weights
    fmt = RECORDED if run.timing.precision == "fp32" else run_format(run.timing.backend, run.timing.precision)
    for s in served:
        module = FORMATS[fmt].read((run.out / s["files"][fmt]["file"]).read_bytes())
        r = s["arch"]["resolution"]
        if fmt != RECORDED:  # what the precision costs: the same subnet's own fp32 weights on the same images
            fp32 = FORMATS[RECORDED].read((run.out / s["files"][RECORDED]["file"]).read_bytes())
            s["test_accuracy_fp32"] = round(accuracy(fp32, test, spec, r), 3)
        s["test_accuracy"] = round(accuracy(module, test, spec, r), 3)
        s["val_accuracy"] = round(accuracy(module, val, spec, r), 3)
    for b in bases:  # at int8 its quantized file, timed as the served files are, and its fp32 weights beside it
        r = b.row["resolution"]
        module = b.module if fmt == RECORDED else FORMATS[fmt].read((run.out / b.row["file"]).read_bytes())
        if fmt != RECORDED:
            b.row["test_accuracy_fp32"] = round(accuracy(b.module, test, spec, r), 3)
        b.row["test_accuracy"] = round(accuracy(module, test, spec, r), 3)
    return len(test), len(val)


def _baseline_part(run: _Run, b: Baseline, resolution: int):
    """What is timed of baseline ``b``: at fp32 torchvision's network (its weights do not change its time); at a
    quantized precision its own file as the target runs a served one (exported to ONNX, quantized by the
    format's quantizer on the served subnets' calibration images), written beside its weights (``row["file"]``)
    and tested too (:func:`_measure_accuracy`): a network quantized from random weights on noise is not it."""
    import torch

    from ..calibrate import calibration_batches, served_images
    from ..export import FORMATS, export_onnx, run_format
    from ..predict.timing import Part

    art, shape = run.art, (run.art.space.in_channels, resolution, resolution)
    if run.timing.precision == "fp32":
        return Part("mobilenet_v3_small", shape, width_mult=b.row["width_mult"])
    fmt = run_format(run.timing.backend, run.timing.precision)
    batches = (x.numpy() for x in calibration_batches(served_images(art), art.data, resolution))
    with torch.no_grad():
        data = FORMATS[fmt].quantize(export_onnx(b.module, torch.zeros(1, *shape)), batches)
    path = run.out / "baselines" / f"mbv3-small-x{b.row['width_mult']:g}.{fmt}.onnx"
    atomic_write_text(path, data)
    b.row["file"] = str(path.relative_to(run.out))
    return Part("file", shape, file=str(path))


def run_report(artifact: str | Path, target: str, out: str | Path, budgets: int = 3,
               budget_ms: Sequence[float] = (), baselines: Sequence[float] = (), baseline_epochs: float | None = None,
               data_dir: str | None = None, progress: bool = True, log: Log = lambda s: None,
               accept_noisy: bool = False) -> Report:
    """Serve ``artifact``, specialise it for the budgets through ``ofa-client``, measure; the report (a dict
    that is report.json; :func:`write_report` writes it with its markdown and plot).

    Latency goes through the one mechanism a deployment uses: the table's references are re-timed
    here first (the device's speed now, as a device does before it asks), every search carries
    those timings, and the served subnets are then timed with the references again, all by the
    timing protocol of :mod:`ofa.predict.timing`, each run gated by the protocol's own repeatability
    check (timed again with more rounds; refused, or with ``accept_noisy`` used and labelled). Where the
    references' two timings put the machine more than 5% apart, the report says so (:func:`speed_change`).
    """
    from ..predict.timing import export_folder

    check_report_settings(budgets, budget_ms)
    run = _open(Path(artifact), target, Path(out), progress, log)
    run.accept_noisy = accept_noisy
    art, space = run.art, run.art.space
    training = art.manifest["training"]
    epochs = baseline_epochs or sum(p["epochs"] for p in training["phases"])
    (run.out / "subnets").mkdir(parents=True, exist_ok=True)
    bases: list[Baseline] = []
    res = max(space.resolutions)
    if baselines:
        log(f"baselines: torchvision mobilenet_v3_small x{', x'.join(f'{w:g}' for w in baselines)}, "
            f"from scratch, {epochs:g} epochs at {res} px")
        bases = train_baselines(art, baselines, epochs, run.out, data_dir, progress, log)
    run.base_parts = [_baseline_part(run, b, res) for b in bases]
    with export_folder() as run.exported:  # the references and baselines exported once, timed in every pass
        served = _serve(run, bases, budgets, budget_ms)
        log(f"measuring the {len(served['served'])} served subnets on this machine: latency of the files as "
            f"fetched, with the references and baselines in the same interleaved passes; then test accuracy")
        after = _time_served(run, served["served"], bases)
    test_images, val_images = _measure_accuracy(run, served["served"], bases, data_dir)
    reference = {"subnets": len(run.refs), "ratios_before": served["ratios_before"],
                 "speed_before": served["speed_before"], **after, "untrusted_timings": run.untrusted,
                 **speed_change(served["ratios_before"], after["ratios_after"])}
    return Report(**{
        "artifact": str(art.path), "digest": art.digest, "space": space.name, "dataset": training["dataset"],
        "target": target, "device": run.table["device"], "table_fit": run.table.get("fit"), "reference": reference,
        "timing": run.timing.protocol(), "accuracy_predictor": _predictor_quality(art), "health": served["health"],
        "front": served["front"], "served": served["served"], "unmet": served["unmet"],
        "baselines": [b.row for b in bases], "baseline_epochs": epochs if bases else None,
        "baseline_epochs_given": bool(bases and baseline_epochs),
        "test_images": test_images, "val_images": val_images,
        "tolerances": {"accuracy_points": ACCURACY_TOLERANCE, "latency_relative": LATENCY_TOLERANCE},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    })


def write_report(report: Report, out: str | Path, command: str | None = None) -> Path:
    """report.json, report.md (naming ``command``, if given) and pareto.png in ``out``; the markdown's path."""
    from .render import plot_report, render_markdown

    out = Path(out)
    plot_report(report, out / "pareto.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    (out / "report.md").write_text(render_markdown(report, command))
    return out / "report.md"


def speed_change(before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
    """How the machine's speed moved between the references' timing before the searches and their timing
    beside the served subnets (each a ratio per reference to its profiled time): the median of the per-reference
    quotients, and whether it lies further from 1 than :data:`~ofa.predict.latency.SPEED_TOLERANCE` (a latency
    check of such a run compares a prediction at one speed with a measurement at another)."""
    change = float(np.median(np.asarray(after, float) / np.asarray(before, float)))
    return {"speed_change": round(change, 4), "speed_changed": bool(abs(change - 1) > SPEED_TOLERANCE)}


def _predictor_quality(art: Artifact) -> dict[str, Any]:
    from ..predict.accuracy import AccuracyPredictor

    pred = AccuracyPredictor.from_bytes(art.files.read(ACCURACY_PREDICTOR))
    return {"family": pred.family, "train_samples": pred.info.get("train_samples"),
            "test_samples": pred.info.get("test_samples"), "test": pred.info.get("test"),
            "interval": pred.interval.to_meta() if pred.interval is not None else None,
            "shift": pred.shift.to_meta() if pred.shift is not None else None}
