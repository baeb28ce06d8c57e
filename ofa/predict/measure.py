"""The accuracy dataset: measured validation accuracy of subnets taken out of a supernet.

Subnets are sampled stratified over MACs (so both ends of the space are covered) with
the corners of every resolution included; each is extracted, BN re-calibrated on the
artifact's calibration images and evaluated on the held-out validation split that
training set aside (never the test set). Measurements are keyed by arch id and kept
in the artifact (:data:`ofa.artifact.MEASUREMENTS`), so adding samples later measures only
the new ones. Each measurement keeps which validation images the subnet got right
(``correct``: the bits of ``numpy.packbits``, base64), from which ``ofa predictors``
reports how high a Kendall τ the validation split's size allows at all.
"""
from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..data import DataError, DataSpec, ImageSet, load_dataset, split_test, split_validation
from ..evaluate import EVAL_BATCH, percent_correct, subnet_correct
from ..space import Arch, SearchSpace
from ..supernet import Supernet
from .accuracy import FOLDS
from .cost import CostModel

__all__ = ["MIN_FIT", "held_out", "measure_accuracies", "measure_shift", "pack_correct", "stratified_archs",
           "test_halves", "unpack_correct", "validation_set", "with_enough_on_each_side"]


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
    """The validation split a training run held out, rebuilt from its recorded config; for an imported
    reference checkpoint, the ImageFolder tree ``data_dir`` (``CLASS/*.jpg``, or a ``val/`` in it)
    prepared as the reference evaluates (resize to resolution / 0.875, centre crop)."""
    if training.get("imported_from"):
        return _imported_validation(training, data_dir)
    full, spec = load_dataset(training["dataset"], data_dir or training.get("data_dir") or None, True,
                              training.get("image_size", 224))
    _, val = split_validation(full, training["val_size"], training["seed"])
    return val, spec


def test_halves(training: dict[str, Any], data_dir: str | None = None) -> tuple[ImageSet, ImageSet] | None:
    """The test split of a training run's dataset cut in two (:func:`ofa.data.split_test`: the shift half,
    the evaluation half); None for an imported supernet or a dataset without a test split."""
    if training.get("imported_from"):
        return None
    try:
        test, _ = load_dataset(training["dataset"], data_dir or training.get("data_dir") or None, False,
                               training.get("image_size", 224))
    except DataError:
        return None
    return split_test(test, training["seed"])


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


def measure_shift(supernet: Supernet, archs: Sequence[Arch], calib: torch.Tensor, shift: ImageSet, spec: DataSpec,
                  measured: dict[str, dict[str, Any]], progress: bool = True) -> dict[str, dict[str, Any]]:
    """``measured`` with each of ``archs`` (measured already) also measured on the test split's shift half:
    ``shift_accuracy`` and ``shift_correct``; ones measured there before are kept."""
    out = dict(measured)
    todo = [a for a in archs if "shift_correct" not in out[a.id]]
    for arch in tqdm(todo, desc="measuring on test images", unit="subnet", disable=not progress,
                     dynamic_ncols=True):
        hits = subnet_correct(supernet, arch, calib, shift, spec).numpy()
        out[arch.id] = {**out[arch.id], "shift_accuracy": round(percent_correct(hits), 4),
                        "shift_correct": pack_correct(hits)}
    return out


MIN_FIT = 2 * FOLDS  # subnets to fit on: select_and_fit's folds of at least 2


def held_out(ids: Sequence[str], test_fraction: float) -> np.ndarray:
    """True for the held-out ids: decided by each id alone, so the split is stable as samples grow."""
    return np.array([int(i[:8], 16) % 10_000 < test_fraction * 10_000 for i in ids], dtype=bool)


def with_enough_on_each_side(space: SearchSpace, archs: list[Arch], known: Sequence[str], test_fraction: float,
                             seed: int) -> list[Arch]:
    """``archs`` plus random ones until, with the ``known`` ids, the split leaves MIN_FIT to fit and 2 held out."""
    archs, ids = list(archs), set(known) | {a.id for a in archs}
    n_held = int(held_out(sorted(ids), test_fraction).sum())
    n_fit = len(ids) - n_held
    rng = np.random.default_rng([seed, 1])
    for _ in range(10_000):
        if n_fit >= MIN_FIT and n_held >= 2:
            return archs
        extra = space.sample(rng)
        if extra.id not in ids:
            archs.append(extra)
            ids.add(extra.id)
            held = bool(held_out([extra.id], test_fraction)[0])
            n_held, n_fit = n_held + held, n_fit + (not held)
    raise ValueError(f"test_fraction {test_fraction} holds out too few subnets: 10,000 more would not give 2")


def _imported_validation(training: dict[str, Any], data_dir: str | None) -> tuple[ImageSet, DataSpec]:
    from ..data import imagenet_spec
    from ..folder import open_folder

    if not data_dir:
        raise DataError("data_dir is needed to measure an imported supernet: its validation images as an "
                        "ImageFolder tree (CLASS/*.jpg, classes in the classifier's order: ImageNet's val)")
    split = Path(data_dir) / "val" if (Path(data_dir) / "val").is_dir() else Path(data_dir)
    spec = imagenet_spec(training["image_size"])
    index = open_folder(split)
    if len(index.classes) != spec.num_classes:
        raise DataError(f"data_dir {split} has {len(index.classes)} class folders; the supernet classifies "
                        f"{spec.num_classes} (ImageNet's, in the sorted order of their folder names)")
    return index.load(spec.image_size, training.get("eval_crop", 1.0)), spec
