"""The accuracy dataset: measured validation accuracy of subnets taken out of a supernet.

Subnets are sampled stratified over MACs (so both ends of the space are covered) with
the corners of every resolution included; each is extracted, BN re-calibrated on the
artifact's calibration images and evaluated on the held-out validation split that
training set aside (never the test set). Measurements are keyed by arch id and kept
in the artifact (``accuracy/measurements.json``), so adding samples later measures only
the new ones. Each measurement keeps which validation images the subnet got right
(``correct``: the bits of ``numpy.packbits``, base64), from which ``ofa predictors``
reports how high a Kendall τ the validation split's size allows at all.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..data import DataSpec, ImageSet, load_dataset, split_validation
from ..evaluate import EVAL_BATCH, percent_correct, subnet_correct
from ..space import Arch, SearchSpace
from ..supernet import Supernet
from .accuracy import FOLDS
from .cost import CostModel

if TYPE_CHECKING:
    from .latency import LatencyPredictor

__all__ = ["MEASUREMENTS", "check_predictor_settings", "front_archs", "measure_accuracies", "pack_correct",
           "stratified_archs", "unpack_correct", "validation_set"]

MEASUREMENTS = "accuracy/measurements.json"


def stratified_archs(space: SearchSpace, n: int, seed: int = 0) -> list[Arch]:
    """``n`` distinct archs: the smallest and largest at every resolution, the rest one per MACs stratum."""
    corners = [f(r) for r in space.resolutions for f in (space.smallest, space.largest)]
    chosen: dict[str, Arch] = {}
    for arch in corners[:n]:
        chosen.setdefault(arch.id, arch)
    rest = n - len(chosen)
    if rest <= 0:
        return list(chosen.values())
    rng = np.random.default_rng(seed)
    pool = space.sample_codes(rng, 20 * rest)
    order = np.argsort(CostModel(space).macs(pool), kind="stable")
    for stratum in np.array_split(order, rest):
        for i in rng.permutation(stratum):
            arch = space.decode(pool[i : i + 1])[0]
            if arch.id not in chosen:
                chosen[arch.id] = arch
                break
    return list(chosen.values())


def validation_set(training: dict[str, Any], data_dir: str | None = None) -> tuple[ImageSet, DataSpec]:
    """The validation split a training run held out, rebuilt from its recorded config."""
    full, spec = load_dataset(training["dataset"], data_dir or training.get("data_dir") or None, True,
                              training.get("image_size", 224))
    _, val = split_validation(full, training["val_size"], training["seed"])
    return val, spec


def pack_correct(hits: np.ndarray) -> str:
    """Per-image correctness (bool) as base64 text: one bit per image."""
    return base64.b64encode(np.packbits(np.asarray(hits, dtype=bool)).tobytes()).decode()


def unpack_correct(text: str, images: int) -> np.ndarray:
    """The inverse of :func:`pack_correct` for ``images`` images."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8))
    if len(bits) < images:
        raise ValueError(f"per-image correctness holds {len(bits)} bits, expected {images}")
    return bits[:images].astype(bool)


def measure_accuracies(supernet: Supernet, archs: Sequence[Arch], calib: torch.Tensor, val: ImageSet,
                       spec: DataSpec, known: dict[str, dict[str, Any]] | None = None, progress: bool = True,
                       on_result: Callable[[dict[str, dict[str, Any]]], None] | None = None,
                       batch_size: int = EVAL_BATCH) -> dict[str, dict[str, Any]]:
    """{arch id: {arch, accuracy, macs, params, correct}} for ``archs``; ids already in ``known`` are kept."""
    out = dict(known or {})
    cost = CostModel(supernet.space)
    todo = [a for a in archs if a.id not in out]
    t_last = time.monotonic()
    for arch in tqdm(todo, desc="measuring subnets", unit="subnet", disable=not progress, dynamic_ncols=True):
        hits = subnet_correct(supernet, arch, calib, val, spec, batch_size).numpy()
        out[arch.id] = {"arch": json.loads(arch.to_json()), "accuracy": round(percent_correct(hits), 4),
                        "macs": cost.arch_macs(arch), "params": cost.arch_params(arch),
                        "correct": pack_correct(hits)}
        if on_result is not None and time.monotonic() - t_last > 30:
            on_result(out)  # a crash loses at most half a minute of measurements
            t_last = time.monotonic()
    return out


MIN_FIT = 2 * FOLDS  # subnets to fit on: select_and_fit's folds of at least 2


def _split(ids: Sequence[str], test_fraction: float) -> np.ndarray:
    """True for the held-out ids: decided by each id alone, so the split is stable as samples grow."""
    return np.array([int(i[:8], 16) % 10_000 < test_fraction * 10_000 for i in ids], dtype=bool)


def with_enough_on_each_side(space: SearchSpace, archs: list[Arch], known: Sequence[str], test_fraction: float,
                             seed: int) -> list[Arch]:
    """``archs`` plus random ones until, with the ``known`` ids, the split leaves MIN_FIT to fit and 2 held out."""
    archs, ids = list(archs), set(known) | {a.id for a in archs}
    n_held = int(_split(sorted(ids), test_fraction).sum())
    n_fit = len(ids) - n_held
    rng = np.random.default_rng([seed, 1])
    for _ in range(10_000):
        if n_fit >= MIN_FIT and n_held >= 2:
            return archs
        extra = space.sample(rng)
        if extra.id not in ids:
            archs.append(extra)
            ids.add(extra.id)
            held = bool(_split([extra.id], test_fraction)[0])
            n_held, n_fit = n_held + held, n_fit + (not held)
    raise ValueError(f"test_fraction {test_fraction} holds out too few subnets: 10,000 more would not give 2")


FRONT_ROUNDS = 2


def front_archs(space: SearchSpace, measured: dict[str, dict[str, Any]], k: int, seed: int,
                exclude: Iterable[str] = (), latency: LatencyPredictor | None = None,
                families: Sequence[str] | None = None) -> list[Arch]:
    """``k`` new archs (in neither ``measured`` nor ``exclude``) spread along the front that the search
    would pick from with a predictor fitted on ``measured``: the accuracy-latency front of ``latency``'s
    target when given (where served subnets come from), else the accuracy-MACs front.

    A search picks the archs its predictor rates highest for their cost, so that is where the
    predictor's errors matter and are biased upward (the winner's curse): measuring there puts
    the samples where the served subnets come from. The interim predictor is of the family
    cross-validation picks on ``measured``, as the final one will be.
    """
    from ..search import Constraints, Scorer, SearchSettings, pareto_front
    from .accuracy import arch_features, select_and_fit
    from ..space import space_digest

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


def check_predictor_settings(samples: int = 10, test_fraction: float = 0.2, front: int = 0) -> None:
    """Refuse settings :func:`build_accuracy_predictor` cannot use, naming the field."""
    if samples < 10:
        raise ValueError(f"samples must be >= 10, got {samples}")
    if not 0 <= front <= samples - 10:
        raise ValueError(f"front must be in 0..{samples - 10} (samples - 10), got {front}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def build_accuracy_predictor(root, samples: int = 300, seed: int = 0, test_fraction: float = 0.2,
                             calib_images: int | None = None, data_dir: str | None = None,
                             families: Sequence[str] | None = None, front: int = 0, front_target: str | None = None,
                             progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure ``samples`` subnets of the artifact at ``root``, pick and fit a predictor, store both.

    ``front`` of the samples are taken where the search will look (:func:`front_archs`, in
    two rounds, each after a fit on what is measured so far; along the latency front of the
    artifact's ``front_target`` table when given, else along MACs); the others are stratified
    over MACs. The held-out subnets (``test_fraction``, chosen by arch id) are used for
    nothing but the reported quality; the family is chosen by cross-validation on the
    others. The stored predictor is the one whose held-out figures are reported.
    """
    from pathlib import Path

    from ..artifact import add_file, load_artifact
    from .accuracy import arch_features, evaluate, fit_many, select_and_fit, tau_ceiling
    from ..space import space_digest

    check_predictor_settings(samples, test_fraction, front)
    root = Path(root)
    art = load_artifact(root)
    calib = art.calibration if calib_images is None else art.calibration[:calib_images]
    if len(calib) < 1:
        raise ValueError(f"calib_images must be in 1..{len(art.calibration)}, got {calib_images}")
    val, spec = validation_set(art.manifest["training"], data_dir)
    header = {"artifact": art.digest, "calib_images": len(calib), "split": "validation", "val_images": len(val)}
    known: dict[str, dict[str, Any]] = {}
    if MEASUREMENTS in art.manifest["files"]:
        old = json.loads((root / MEASUREMENTS).read_text())
        if all(old.get(k) == v for k, v in header.items()):
            known = old["subnets"]
        else:
            log("existing measurements were made differently (artifact, calibration or split); measuring anew")

    def save(measured: dict[str, dict[str, Any]]) -> None:
        add_file(root, MEASUREMENTS, json.dumps({**header, "subnets": measured}, sort_keys=True, indent=0))

    latency = None
    if front and front_target is not None:
        from ..search.load import load_scorer

        scorer = load_scorer(root)
        if front_target not in scorer.latency:
            raise ValueError(f"front_target {front_target!r} is not a latency target of {root}; it has "
                             f"{sorted(scorer.latency)}{' (refused: ' + str(scorer.refused) + ')' if scorer.refused else ''}")
        latency = scorer.latency[front_target]
    # decided without what earlier runs measured: with it the extras (and so each round's basis, and its picks)
    # would differ from that run's, and a rerun would measure new front subnets instead of finding them
    archs = with_enough_on_each_side(art.space, stratified_archs(art.space, samples - front, seed), [],
                                     test_fraction, seed)
    if len(archs) > samples - front:
        log(f"measuring {len(archs) - samples + front} random subnets more: the split by arch id (test fraction "
            f"{test_fraction}) must leave at least {MIN_FIT} to fit and 2 held out")
    t0 = time.perf_counter()
    measured = measure_accuracies(art.supernet, archs, calib, val, spec, known, progress, save)
    basis = {a.id: measured[a.id] for a in archs}  # what each front round's interim fit sees: this run's picks
    for r in range(FRONT_ROUNDS if front else 0):
        k = front // FRONT_ROUNDS + (r < front % FRONT_ROUNDS)
        # the picks of a round are a function of its basis, k and seed: a rerun finds them measured
        along = json.dumps(latency.table, sort_keys=True) if latency else "macs"  # the front it was picked along
        tag = hashlib.sha256(json.dumps([sorted(basis), k, seed + r, along]).encode()).hexdigest()[:16]
        picked = [i for i in sorted(measured) if measured[i].get("front") == tag]
        if len(picked) < k:
            # picks measured already (a round killed halfway) are reused, not replaced by others
            archs_r = front_archs(art.space, basis, k, seed + r, latency=latency, families=families)
            log(f"front round {r + 1}: measuring {len(archs_r)} subnets where the search would look")
            measured = measure_accuracies(art.supernet, archs_r, calib, val, spec, measured, progress, save)
            picked = [a.id for a in archs_r]
            for i in picked:
                measured[i]["front"] = tag
        else:
            log(f"front round {r + 1}: its {len(picked)} subnets were measured before")
        basis.update({i: measured[i] for i in picked})
    save(measured)
    measure_s = time.perf_counter() - t0
    ids = sorted(measured)
    codes = art.space.encode([Arch.from_dict(measured[i]["arch"]) for i in ids])
    x = arch_features(art.space, codes)
    y = np.array([measured[i]["accuracy"] for i in ids])
    held = _split(ids, test_fraction)
    x_tr, y_tr, x_te, y_te = x[~held], y[~held], x[held], y[held]
    log(f"{len(ids)} measured subnets ({len(y_tr)} to fit, {len(y_te)} held out); "
        f"accuracy {y.min():.2f}-{y.max():.2f}%")
    digest = space_digest(art.space)
    # a predictor fitted before on exactly these measurements and settings is the one this fit would make
    fit_key = hashlib.sha256(json.dumps({"measured": [[i, measured[i]["accuracy"]] for i in ids], "seed": seed,
                                         "test_fraction": test_fraction, "families": families, "front": front,
                                         "front_target": front_target},
                                        sort_keys=True).encode()).hexdigest()
    stored = root / "accuracy_predictor.safetensors"
    if "accuracy_predictor.safetensors" in art.manifest["files"] and stored.exists():
        from .accuracy import AccuracyPredictor

        old_pred = AccuracyPredictor.from_bytes(stored.read_bytes(), art.space)
        if old_pred.info.get("fit_key") == fit_key and old_pred.info.get("artifact") == art.digest:
            log(f"the stored predictor ({old_pred.family}) was fitted on these {len(ids)} measurements with these "
                f"settings: reusing it")
            return {**old_pred.info, "measure_seconds": round(measure_s, 1), "reused": True,
                    "held_out": {"ids": [i for i, h in zip(ids, held) if h], "measured": y_te.tolist(),
                                 "predicted": old_pred.predict_features(x_te).tolist()}}
    pred, cv = select_and_fit(x_tr, y_tr, digest, families, seed=seed, log=log)
    test = evaluate(pred, x_te, y_te)
    # measurements made before per-image correctness was kept have none: the ceiling uses the others
    graded = [unpack_correct(measured[i]["correct"], len(val)) for i, h in zip(ids, held) if h and "correct" in measured[i]]
    if len(graded) >= 2:
        test = {**test, "tau_ceiling": round(tau_ceiling(np.stack(graded)), 4), "tau_ceiling_subnets": len(graded)}
        log(f"the {len(val)}-image validation split lets any predictor reach at most Kendall tau "
            f"{test['tau_ceiling']:.3f} on these {len(graded)} held-out subnets")
    order = np.random.default_rng(seed).permutation(len(y_tr))
    sizes = [max(10, int(round(frac * len(y_tr)))) for frac in (0.25, 0.5, 0.75)]
    smaller = fit_many(pred.family, [(x_tr[order[:k]], y_tr[order[:k]]) for k in sizes], digest, seed)
    curve = [{"train_samples": k, **evaluate(fitted, x_te, y_te)}
             for k, fitted in zip(sizes + [len(y_tr)], smaller + [pred])]
    info = {"selected": pred.family, "cv": cv, "test": test, "train_samples": int(len(y_tr)),
            "test_samples": int(len(y_te)), "learning_curve": curve, "calib_images": len(calib),
            "seed": seed, "front": front, "front_target": front_target, "artifact": art.digest, "fit_key": fit_key}
    log(f"selected {pred.family}: held-out Kendall tau {test['kendall_tau']:.3f}, RMSE {test['rmse']:.3f} points")
    pred = type(pred)(pred.space_digest, pred.family, pred.members, pred.base, info)
    add_file(root, "accuracy_predictor.safetensors", pred.to_bytes())
    return {**info, "measure_seconds": round(measure_s, 1),
            "held_out": {"ids": [i for i, h in zip(ids, held) if h], "measured": y_te.tolist(),
                         "predicted": pred.predict_features(x_te).tolist()}}
