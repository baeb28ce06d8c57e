"""The predictors of an artifact, read without building the supernet (numpy only)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..artifact import ACCURACY_PREDICTOR, MEASUREMENTS, ArtifactError, ArtifactFiles, open_artifact
from ..predict.accuracy import AccuracyPredictor
from ..predict.latency import LatencyPredictor, LatencyTableError
from .scorer import Scorer

__all__ = ["Measured", "load_measured", "load_scorer"]


class Measured(NamedTuple):
    """A subnet's measured top-1 accuracy (%), on which split and how many images."""

    accuracy: float
    split: str
    images: int


def load_measured(files: ArtifactFiles) -> dict[str, Measured]:
    """The accuracies ``ofa predictors`` measured on these very weights, by subnet id (none if they were
    measured on other weights: a measurement never stands for another artifact's subnet)."""
    if not files.has(MEASUREMENTS):
        return {}
    data = files.read_json(MEASUREMENTS)
    if not isinstance(data, dict) or data.get("artifact") != files.digest:
        return {}
    split, images = str(data.get("split", "validation")), int(data.get("val_images", 0))
    return {str(i): Measured(float(m["accuracy"]), split, images) for i, m in (data.get("subnets") or {}).items()
            if isinstance(m, dict) and isinstance(m.get("accuracy"), (int, float))}


def load_scorer(artifact: str | Path | ArtifactFiles, verify: bool = True) -> Scorer:
    """A :class:`Scorer` from an artifact's space, accuracy predictor and latency tables.

    ``artifact`` is a folder, or the files of one opened already (:func:`ofa.artifact.open_artifact`,
    ``Artifact.files``: what they verified is not hashed again). Every file used must match its
    sha256 in the manifest (with ``verify``); a predictor made for another space is refused with
    the reason, and so is a latency table that does not load (another space, an old version):
    the scorer then names it in ``refused``.
    """
    files = artifact if isinstance(artifact, ArtifactFiles) else open_artifact(artifact, verify)
    root = files.root
    space = files.space()
    accuracy = None
    if files.has(ACCURACY_PREDICTOR):
        accuracy = AccuracyPredictor.from_bytes(files.read(ACCURACY_PREDICTOR), space, str(root / ACCURACY_PREDICTOR))
        fitted_on = accuracy.info.get("artifact")
        if fitted_on is not None and fitted_on != files.digest:
            raise ArtifactError(f"{root / ACCURACY_PREDICTOR} was fitted on the subnets of artifact "
                                f"{str(fitted_on)[:12]}, not this one ({str(files.digest)[:12]}): fit it on these "
                                f"weights (`ofa predictors`)")
    latency, refused = {}, {}
    for target, name in files.latency_targets().items():
        try:
            pred = LatencyPredictor(space, files.read_json(name))
        except LatencyTableError as e:  # e.g. a version 1 table: the other targets still serve
            refused[target] = f"{root / name}: {e}"
            continue
        latency[pred.target] = pred
    return Scorer(space, accuracy, latency, refused)
