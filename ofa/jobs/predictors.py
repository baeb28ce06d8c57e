"""``ofa predictors``: measure subnets of an artifact, pick and fit the accuracy predictor, store both in it.

Samples are stratified over MACs (corners included); ``front`` of them are taken where the
search will look (:func:`front_archs`, in rounds, each after a fit on what is measured so
far). The held-out subnets (``test_fraction``, chosen by arch id) serve only the reported
quality; the family is chosen by cross-validation on the others. Measurements are kept in
the artifact, so a rerun measures only what is new, and a fit made before on exactly the same
measurements and settings is reused.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..artifact import ACCURACY_PREDICTOR, MEASUREMENTS, SERVED_CALIBRATION, Artifact, add_file, load_artifact
from ..predict.measure import (MIN_FIT, held_out, measure_accuracies, measure_shift, stratified_archs, test_halves,
                               unpack_correct, validation_set, with_enough_on_each_side)
from ..predict.interval import METHOD as INTERVAL_METHOD
from ..predict.shift import METHOD as SHIFT_METHOD
from ..space import Arch, SearchSpace, space_digest

__all__ = ["FRONT_ROUNDS", "LOOP_BUDGETS", "LOOP_ROUNDS", "build_accuracy_predictor", "check_predictor_settings",
           "front_archs", "search_picks"]

FRONT_ROUNDS = 2
LOOP_ROUNDS = 2  # closed-loop rounds at most: search, measure the picks, refit
LOOP_BUDGETS = 5  # latency budgets per round, spread along the front as a report spreads its budgets
Log = Callable[[str], None]


def check_predictor_settings(samples: int = 10, test_fraction: float = 0.2, front: int = 0,
                             families: Sequence[str] | None = None, loop_rounds: int = 0,
                             loop_budgets: int = LOOP_BUDGETS, front_target: str | None = None) -> None:
    """Refuse settings :func:`build_accuracy_predictor` cannot use, naming the field."""
    if not 0 <= loop_rounds <= 10:
        raise ValueError(f"loop_rounds must be in 0..10, got {loop_rounds}")
    if loop_rounds and front_target is None:
        raise ValueError("loop_rounds needs a front_target: the closed loop measures what the search serves for "
                         "a latency target")
    if not 1 <= loop_budgets <= 20:
        raise ValueError(f"loop_budgets must be in 1..20, got {loop_budgets}")
    from ..predict.accuracy import FAMILIES

    unknown = sorted(set(families or ()) - set(FAMILIES))
    if unknown or (families is not None and not families):
        raise ValueError(f"families must be names of {sorted(FAMILIES)}, got {list(families or ())}")
    if samples < 10:
        raise ValueError(f"samples must be >= 10, got {samples}")
    if not 0 <= front <= samples - 10:
        raise ValueError(f"front must be in 0..{samples - 10} (samples - 10), got {front}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def front_archs(space: SearchSpace, measured: dict[str, dict[str, Any]], k: int, seed: int,
                exclude: Iterable[str] = (), latency=None, families: Sequence[str] | None = None) -> list[Arch]:
    """``k`` new archs (in neither ``measured`` nor ``exclude``) spread along the front that the search
    would pick from with a predictor fitted on ``measured``: the accuracy-latency front of ``latency``'s
    target when given (where served subnets come from), else the accuracy-MACs front.

    A search picks the archs its predictor rates highest for their cost, so that is where the
    predictor's errors matter and are biased upward (the winner's curse): measuring there puts
    the samples where the served subnets come from. The interim predictor is of the family
    cross-validation picks on ``measured``, as the final one will be.
    """
    from ..predict.accuracy import arch_features, select_and_fit
    from ..search import Constraints, Scorer, SearchSettings, pareto_front

    ids = sorted(measured)
    x = arch_features(space, space.encode([Arch.from_dict(measured[i]["arch"]) for i in ids]))
    interim, _ = select_and_fit(x, np.array([measured[i]["accuracy"] for i in ids]), space_digest(space), families,
                                seed=seed)
    target = None if latency is None else latency.target
    scorer = Scorer(space, interim, {} if latency is None else {target: latency})
    front = pareto_front(scorer, min(100, 2 * k + 2), target, Constraints(),
                         SearchSettings(population=100, generations=60, seed=seed))
    skip = set(measured) | set(exclude)
    new = [c.arch for c in front if c.arch.id not in skip]
    picks = np.unique(np.linspace(0, len(new) - 1, min(k, len(new))).round().astype(int)) if new else []
    return [new[i] for i in picks]


def search_picks(space: SearchSpace, predictor, latency, budgets: int, seed: int = 0) -> list:
    """The candidates the service would return for ``budgets`` latency budgets spread along the front of
    ``latency``'s target (as ``ofa report`` spreads them: 10% to 90% of the front's range), searched with
    the service's default settings and ``seed``."""
    from ..search import Constraints, Scorer, SearchSettings, pareto_front, search
    from .report import budgets_from_front

    scorer = Scorer(space, predictor, {latency.target: latency})
    front = pareto_front(scorer, 10, latency.target, Constraints(), SearchSettings(generations=100, seed=seed))
    plan = budgets_from_front([c.latency_ms for c in front], budgets)
    return [search(scorer, Constraints(max_latency_ms=ms), latency.target, SearchSettings(seed=seed)).best
            for _, ms in plan]


def _closed_loop(job: "_Job", measured: dict, fit: Callable[[dict], Any], pred, latency, rounds: int,
                 budgets: int) -> tuple[Any, dict, dict[str, Any]]:
    """Measure what the search would serve, refit, repeat: until every pick's measured accuracy lies in its
    predicted interval, or ``rounds`` run out. The picks stay in the measurements (so the server can say a
    served subnet's *measured* accuracy); returns the last predictor, the measurements and a summary."""
    history: list[dict[str, Any]] = []
    agreed, added = False, 0
    for r in range(rounds):
        picks = list({c.arch.id: c for c in search_picks(job.art.space, pred, latency, budgets)}.values())
        new = [c.arch for c in picks if c.arch.id not in measured]
        job.log(f"closed loop round {r + 1}: the search picks {len(picks)} subnets for {budgets} budgets on "
                f"{latency.target!r}; measuring the {len(new)} not measured yet")
        measured = job.measure(new, measured)
        for a in new:
            measured[a.id]["loop"] = r + 1
        added += len(new)
        job.save(measured)
        rows = [{"id": c.arch.id, "predicted": c.accuracy, "low": c.accuracy_low, "high": c.accuracy_high,
                 "extrapolated": c.extrapolated, "measured": measured[c.arch.id]["accuracy"]} for c in picks]
        for row in rows:
            low, high = (row["low"], row["high"]) if row["low"] is not None else (row["predicted"],) * 2
            row["inside"] = bool(low <= row["measured"] <= high)
        inside = sum(row["inside"] for row in rows)
        history.append({"round": r + 1, "family": pred.family, "picks": rows, "inside": inside})
        job.log(f"  {inside} of {len(rows)} picks measured inside their predicted interval (errors "
                + ", ".join(f"{row['measured'] - row['predicted']:+.2f}" for row in rows) + " points)")
        if inside == len(rows):
            agreed = True
            break
        pred = fit(measured)  # the picks' measurements join the fit (or the held-out side, by their id)
    summary = {"rounds": len(history), "measured": added, "picks": len(history[-1]["picks"]) if history else 0,
               "within": history[-1]["inside"] if history else 0, "agreed": agreed, "budgets": budgets,
               "target": latency.target, "history": history}
    if not agreed and history:
        job.log(f"  the closed loop's {rounds} rounds ran out before the picks agreed with their predictions; "
                f"the predictor is refitted on every measurement")
    return pred, measured, summary


@dataclass
class _Job:
    """One ``build_accuracy_predictor`` run: the artifact, what it measures on, and how measurements are kept."""

    art: Artifact
    calib: Any  # torch.Tensor of uint8 images
    val: Any  # ImageSet
    spec: Any  # DataSpec
    header: dict[str, Any]
    progress: bool
    log: Log
    halves: Any  # (shift half, evaluation half) of the test split, or None

    def known(self) -> dict[str, dict[str, Any]]:
        """Measurements stored before with the same artifact, calibration and split (else none)."""
        if not self.art.files.has(MEASUREMENTS):
            return {}
        old = self.art.files.read_json(MEASUREMENTS)
        if all(old.get(k) == v for k, v in self.header.items()):
            return old["subnets"]
        self.log("existing measurements were made differently (artifact, calibration or split); measuring anew")
        return {}

    def save(self, measured: dict[str, dict[str, Any]]) -> None:
        add_file(self.art.path, MEASUREMENTS, json.dumps({**self.header, "subnets": measured}, sort_keys=True,
                                                         indent=0))

    def measure(self, archs: Sequence[Arch], known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return measure_accuracies(self.art.supernet, archs, self.calib, self.val, self.spec, known, self.progress,
                                  self.save)


def _open(root: Path, calib_images: int | None, data_dir: str | None, progress: bool, log: Log) -> _Job:
    art = load_artifact(root)
    if art.calibration is None:
        raise ValueError(f"{root} has no calibration set: its subnets cannot be re-calibrated to be measured "
                         "(import the checkpoint again with a calib_dir of training images)")
    calib = art.calibration if calib_images is None else art.calibration[:calib_images]
    if len(calib) < 1:
        raise ValueError(f"calib_images must be in 1..{len(art.calibration)}, got {calib_images}")
    val, spec = validation_set(art.manifest["training"], data_dir)
    halves = test_halves(art.manifest["training"], data_dir)
    header = {"artifact": art.digest, "calib_images": len(calib), "split": "validation", "val_images": len(val),
              "shift_images": len(halves[0]) if halves else 0}
    return _Job(art, calib, val, spec, header, progress, log, halves)


def _front_latency(job: _Job, front_target: str | None):
    """The latency predictor of the artifact's ``front_target`` table (None: along MACs)."""
    if front_target is None:
        return None
    from ..search.load import load_scorer

    scorer = load_scorer(job.art.files)
    if front_target not in scorer.latency:
        refused = f" (refused: {scorer.refused})" if scorer.refused else ""
        raise ValueError(f"front_target {front_target!r} is not a latency target of {job.art.path}; it has "
                         f"{sorted(scorer.latency)}{refused}")
    return scorer.latency[front_target]


def _measure_front(job: _Job, measured: dict, basis: dict, front: int, seed: int, latency,
                   families: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """The front rounds: each picks where the search would look with a fit on ``basis`` (this run's picks)."""
    for r in range(FRONT_ROUNDS if front else 0):
        k = front // FRONT_ROUNDS + (r < front % FRONT_ROUNDS)
        # the picks of a round are a function of its basis, k and seed: a rerun finds them measured
        along = json.dumps(latency.table, sort_keys=True) if latency else "macs"  # the front it was picked along
        tag = hashlib.sha256(json.dumps([sorted(basis), k, seed + r, along]).encode()).hexdigest()[:16]
        picked = [i for i in sorted(measured) if measured[i].get("front") == tag]
        if len(picked) < k:
            # picks measured already (a round killed halfway) are reused, not replaced by others; the picks are
            # a function of the basis, so a round that found fewer than k new archs finds the same ones again
            archs = front_archs(job.art.space, basis, k, seed + r, latency=latency, families=families)
            todo = [a for a in archs if a.id not in measured]
            if not archs:
                job.log(f"front round {r + 1}: the front holds no subnet this run has not measured")
            elif todo:
                job.log(f"front round {r + 1}: measuring {len(todo)} subnets where the search would look")
            else:
                job.log(f"front round {r + 1}: its {len(archs)} subnets were measured before")
            measured = job.measure(archs, measured)
            picked = [a.id for a in archs]
            for i in picked:
                measured[i]["front"] = tag
        else:
            job.log(f"front round {r + 1}: its {len(picked)} subnets were measured before")
        basis.update({i: measured[i] for i in picked})
    return measured


def _measure(job: _Job, samples: int, front: int, front_target: str | None, test_fraction: float, seed: int,
             families: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    latency = _front_latency(job, front_target) if front else None
    # decided without what earlier runs measured: with it the extras (and so each round's basis, and its picks)
    # would differ from that run's, and a rerun would measure new front subnets instead of finding them
    archs = with_enough_on_each_side(job.art.space, stratified_archs(job.art.space, samples - front, seed), [],
                                     test_fraction, seed)
    if len(archs) > samples - front:
        job.log(f"measuring {len(archs) - samples + front} random subnets more: the split by arch id (test "
                f"fraction {test_fraction}) must leave at least {MIN_FIT} to fit and 2 held out")
    measured = job.measure(archs, job.known())
    basis = {a.id: measured[a.id] for a in archs}  # what each front round's interim fit sees: this run's picks
    measured = _measure_front(job, measured, basis, front, seed, latency, families)
    job.save(measured)
    return measured


SHIFT_SUBNETS = 10  # measured on the test split's shift half


def _with_shift(job: _Job, pred, measured: dict) -> tuple[Any, dict]:
    """``pred`` with the validation-to-test shift measured on the subnets where the search serves from (the
    closed loop's and front rounds' picks, then the most accurate), when the dataset has a test split."""
    from ..predict.interval import DEFAULT_LEVEL
    from ..predict.shift import estimate_shift

    if job.halves is None:
        job.log("no test split: predictions are of the validation split's accuracy")
        return pred, measured
    # the loop's picks (what the search serves), then the front rounds', then the most accurate: 10 (the
    # offset's error is the images' more than the subnets': more subnets would cost time, not error)
    ids = sorted(measured, key=lambda i: (not measured[i].get("loop"), not measured[i].get("front"),
                                          -measured[i]["accuracy"], i))[:SHIFT_SUBNETS]
    measured = measure_shift(job.art.supernet, [Arch.from_dict(measured[i]["arch"]) for i in ids], job.calib,
                             job.halves[0], job.spec, measured, job.progress)
    job.save(measured)
    shift = estimate_shift(np.stack([unpack_correct(measured[i]["correct"], len(job.val)) for i in ids]),
                           np.stack([unpack_correct(measured[i]["shift_correct"], len(job.halves[0])) for i in ids]),
                           len(job.halves[1]), pred.interval.level if pred.interval else DEFAULT_LEVEL)
    if shift is not None:
        job.log(f"validation to test shift on {len(ids)} subnets ({len(job.halves[0])} test images): "
                f"{shift.offset:+.2f} points, +/-{shift.half_width:.2f} at {shift.level:.0%} on a check of "
                f"{len(job.halves[1])} other test images")
    return replace(pred, shift=shift), measured


def _held_out_report(pred, ids: list[str], held: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> dict[str, Any]:
    return {"ids": [i for i, h in zip(ids, held) if h], "measured": y_te.tolist(),
            "predicted": replace(pred, shift=None).predict_features(x_te).tolist()}  # validation, as measured


def _fit(job: _Job, measured: dict, x, y, held, seed: int, families, recorded: dict[str, Any]):
    """Select the family by cross-validation on the fitting side, fit, and grade on the held-out side; the
    predictor's info records the quality and ``recorded`` (the settings, the artifact, the fit's key)."""
    from ..predict.accuracy import evaluate, fit_many, select_and_fit, tau_ceiling

    ids, digest = sorted(measured), space_digest(job.art.space)
    x_tr, y_tr, x_te, y_te = x[~held], y[~held], x[held], y[held]
    pred, cv = select_and_fit(x_tr, y_tr, digest, families, seed=seed, log=job.log)
    test = evaluate(pred, x_te, y_te)
    # measurements made before per-image correctness was kept have none: the ceiling uses the others
    graded = [unpack_correct(measured[i]["correct"], len(job.val)) for i, h in zip(ids, held)
              if h and "correct" in measured[i]]
    if len(graded) >= 2:
        test = {**test, "tau_ceiling": round(tau_ceiling(np.stack(graded)), 4), "tau_ceiling_subnets": len(graded)}
        job.log(f"the {len(job.val)}-image validation split lets any predictor reach at most Kendall tau "
                f"{test['tau_ceiling']:.3f} on these {len(graded)} held-out subnets")
    order = np.random.default_rng(seed).permutation(len(y_tr))
    sizes = [max(10, int(round(frac * len(y_tr)))) for frac in (0.25, 0.5, 0.75)]
    smaller = fit_many(pred.family, [(x_tr[order[:k]], y_tr[order[:k]]) for k in sizes], digest, seed)
    curve = [{"train_samples": k, **evaluate(fitted, x_te, y_te)}
             for k, fitted in zip(sizes + [len(y_tr)], smaller + [pred])]
    info = {"selected": pred.family, "cv": cv, "test": test, "train_samples": int(len(y_tr)),
            "test_samples": int(len(y_te)), "learning_curve": curve, "calib_images": len(job.calib),
            "seed": seed, **recorded}
    job.log(f"selected {pred.family}: held-out Kendall tau {test['kendall_tau']:.3f}, RMSE {test['rmse']:.3f} points")
    return replace(pred, info=info)


def _stored_fit(job: _Job, fit_key: str):
    """The stored predictor, if it was fitted on exactly these measurements and settings (else None)."""
    from ..predict.accuracy import AccuracyPredictor

    if not job.art.files.has(ACCURACY_PREDICTOR):
        return None
    old = AccuracyPredictor.from_bytes(job.art.files.read(ACCURACY_PREDICTOR), job.art.space)
    return old if old.info.get("fit_key") == fit_key and old.info.get("artifact") == job.art.digest else None


def _dataset(space: SearchSpace, measured: dict, test_fraction: float):
    """ids, features, accuracies and the held-out mask of the measurements."""
    from ..predict.accuracy import arch_features

    ids = sorted(measured)
    x = arch_features(space, space.encode([Arch.from_dict(measured[i]["arch"]) for i in ids]))
    return ids, x, np.array([measured[i]["accuracy"] for i in ids]), held_out(ids, test_fraction)


def build_accuracy_predictor(root: str | Path, samples: int = 300, seed: int = 0, test_fraction: float = 0.2,
                             calib_images: int | None = None, data_dir: str | None = None,
                             families: Sequence[str] | None = None, front: int = 0, front_target: str | None = None,
                             loop_rounds: int = 0, loop_budgets: int = LOOP_BUDGETS,
                             progress: bool = True, log: Log = lambda s: None) -> dict[str, Any]:
    """Measure ``samples`` subnets of the artifact at ``root``, pick and fit a predictor, store both.

    ``front`` of the samples lie along the latency front of the artifact's ``front_target`` table
    when given, else along MACs. With ``loop_rounds`` (and a ``front_target``), the closed loop then
    measures what the search would serve for ``loop_budgets`` budgets and refits, until the picks'
    measurements lie in their intervals. Returns the quality report (what the stored predictor's
    info holds, plus ``measure_seconds``, ``held_out`` predictions and ``reused``).
    """
    check_predictor_settings(samples, test_fraction, front, families, loop_rounds, loop_budgets, front_target)
    job = _open(Path(root), calib_images, data_dir, progress, log)
    t0 = time.perf_counter()
    measured = _measure(job, samples, front, front_target, test_fraction, seed, families)
    settings = {"seed": seed, "test_fraction": test_fraction, "families": families, "front": front,
                "front_target": front_target, "loop_rounds": loop_rounds, "loop_budgets": loop_budgets,
                "interval": INTERVAL_METHOD, "shift": SHIFT_METHOD}  # a fit made another way is not reused

    def key_of(m: dict) -> str:
        return hashlib.sha256(json.dumps({"measured": [[i, m[i]["accuracy"]] for i in sorted(m)], **settings},
                                         sort_keys=True).encode()).hexdigest()

    def fit(m: dict):
        ids, x, y, held = _dataset(job.art.space, m, test_fraction)
        log(f"{len(ids)} measured subnets ({int((~held).sum())} to fit, {int(held.sum())} held out); "
            f"accuracy {y.min():.2f}-{y.max():.2f}%")
        return _fit(job, m, x, y, held, seed, families, {"front": front, "front_target": front_target,
                                                         "artifact": job.art.digest, "fit_key": key_of(m)})

    pred = _stored_fit(job, key_of(measured))
    if pred is not None:
        log(f"the stored predictor ({pred.family}) was fitted on these {len(measured)} measurements with these "
            f"settings: reusing it")
        ids, x, y, held = _dataset(job.art.space, measured, test_fraction)
        return {**pred.info, "measure_seconds": round(time.perf_counter() - t0, 1), "reused": True,
                "held_out": _held_out_report(pred, ids, held, x[held], y[held])}
    pred = fit(measured)
    if loop_rounds:
        pred, measured, loop = _closed_loop(job, measured, fit, pred, _front_latency(job, front_target), loop_rounds,
                                            loop_budgets)
        # the key of what it was finally fitted on: a rerun with these settings finds it and reuses it
        pred = replace(pred, info={**pred.info, "closed_loop": loop, "fit_key": key_of(measured)})
    pred, measured = _with_shift(job, pred, measured)
    add_file(job.art.path, ACCURACY_PREDICTOR, pred.to_bytes(), manifest={SERVED_CALIBRATION: len(job.calib)})
    ids, x, y, held = _dataset(job.art.space, measured, test_fraction)
    return {**pred.info, "measure_seconds": round(time.perf_counter() - t0, 1),
            "held_out": _held_out_report(pred, ids, held, x[held], y[held])}
