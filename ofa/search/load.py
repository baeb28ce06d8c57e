"""The predictors of an artifact, read without building the supernet (numpy only)."""
from __future__ import annotations

import json
from pathlib import Path

from .._io import ArtifactError, folder_lock, sha256_file
from ..predict.accuracy import AccuracyPredictor
from ..predict.latency import LatencyPredictor, LatencyTableError
from ..space import SearchSpace
from .evolution import Scorer

__all__ = ["ACCURACY_PREDICTOR", "load_scorer"]

ACCURACY_PREDICTOR = "accuracy_predictor.safetensors"


def load_scorer(root: str | Path, verify: bool = True) -> Scorer:
    """A :class:`Scorer` from an artifact's space, accuracy predictor and latency tables.

    Every file used must match its sha256 in the manifest (with ``verify``); a predictor made
    for another space is refused with the reason, and so is a latency table that does not
    load (another space, an old version): the scorer then names it in ``refused``.
    """
    root = Path(root)
    with folder_lock(root, exclusive=False):  # not halfway through another process's commit
        return _load_scorer(root, verify)


def _load_scorer(root: Path, verify: bool) -> Scorer:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ArtifactError(f"{root} is not an artifact: manifest.json is missing or invalid") from None

    def read(name: str) -> bytes:
        path = root / name
        if verify and sha256_file(path) != files[name]:
            raise ArtifactError(f"{root}: {name} does not match its sha256 in the manifest")
        return path.read_bytes()

    space = SearchSpace.from_dict(json.loads(read("space.json")))
    accuracy = None
    if ACCURACY_PREDICTOR in files:
        accuracy = AccuracyPredictor.from_bytes(read(ACCURACY_PREDICTOR), space, str(root / ACCURACY_PREDICTOR))
        fitted_on = accuracy.info.get("artifact")
        if fitted_on is not None and fitted_on != manifest.get("digest"):
            raise ArtifactError(f"{root / ACCURACY_PREDICTOR} was fitted on the subnets of artifact "
                                f"{str(fitted_on)[:12]}, not this one ({str(manifest.get('digest'))[:12]}): run "
                                f"`ofa predictors --artifact {root}` to fit it on these weights")
    latency, refused = {}, {}
    for name in sorted(files):
        if name.startswith("latency/") and name.endswith(".json"):
            try:
                pred = LatencyPredictor(space, json.loads(read(name)))
            except LatencyTableError as e:  # e.g. a version 1 table: the other targets still serve
                refused[name[len("latency/"):-len(".json")]] = f"{root / name}: {e}"
                continue
            latency[pred.target] = pred
    return Scorer(space, accuracy, latency, refused)
