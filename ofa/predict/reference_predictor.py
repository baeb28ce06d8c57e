"""The reference's pretrained accuracy predictors as one of ours (numpy only: the caller reads the .pth).

The reference ships two layouts of the same network, a 3x400 MLP over a one-hot arch encoding:

- ``ofa.nas.accuracy_predictor.AccuracyPredictor``: ``layers.{0,1,2}.0`` Linear + ReLU over
  ``[resolution | kernel per block slot | expand per block slot]`` (our encoding, resolutions as
  given to its encoder), ``layers.3`` a Linear to one output without bias, plus ``base_acc``;
- the tutorial's ``AccuracyPredictor`` (the released ``acc_predictor.pth``): an ``nn.Sequential``
  ``0, 2, 4, 6`` of Linear layers with ReLU between, over ``[kernel per slot (60) | expand per slot
  (60) | resolution bucket (8)]``, the bucket of a resolution ``r`` being ``(r - 112) // 16``.

Both predict accuracy as a fraction; ours is in percent (``scale``). The tutorial's buckets become our
per-resolution one-hot by repeating each bucket's weights for the resolutions in it, so both give the
same prediction for every arch. A predictor made for another space is refused with the widths named.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..space import SearchSpace
from .accuracy import AccuracyPredictor, PredictorError, feature_length

__all__ = ["REFERENCE_FAMILY", "from_reference"]

REFERENCE_FAMILY = "reference-mlp-3x400"
_NAS_KEYS = [f"layers.{i}.0.{k}" for i in range(3) for k in ("weight", "bias")] + ["layers.3.weight", "base_acc"]
_TUTORIAL_KEYS = [f"{i}.{k}" for i in (0, 2, 4, 6) for k in ("weight", "bias")]


def _first_layer_nas(w: np.ndarray, space: SearchSpace) -> np.ndarray:
    want = feature_length(space)
    if w.shape[1] != want:
        raise PredictorError(f"the reference predictor takes {w.shape[1]} features; space {space.name!r} encodes "
                             f"an arch in {want} (its {len(space.resolutions)} resolutions and {space.num_slots} "
                             "block slots)")
    return w.T.copy()


def _first_layer_tutorial(w: np.ndarray, space: SearchSpace) -> np.ndarray:
    """(in, out) over our encoding from the tutorial's (out, 128): its bucket columns per resolution first."""
    fits = (space.num_slots == 20 and space.kernel_choices == (3, 5, 7) and space.expand_choices == (3, 4, 6)
            and all(112 <= r < 240 for r in space.resolutions))
    if w.shape[1] != 128 or not fits:
        raise PredictorError(f"the tutorial's reference predictor takes 128 features (20 block slots, kernels 3/5/7, "
                             f"expand 3/4/6, resolutions 112-239); space {space.name!r} has {space.num_slots} slots, "
                             f"kernels {space.kernel_choices}, expand {space.expand_choices}, resolutions "
                             f"{space.resolutions[0]}-{space.resolutions[-1]}")
    buckets = [120 + (r - 112) // 16 for r in space.resolutions]
    return np.concatenate([w[:, buckets], w[:, :60], w[:, 60:120]], axis=1).T.copy()


def from_reference(state: Mapping[str, np.ndarray], space: SearchSpace, source: dict[str, Any] | None = None,
                   scale: float = 100.0) -> AccuracyPredictor:
    """A reference predictor's state dict (either layout, see the module) as one of our predictors."""
    from ..space import space_digest

    w = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    if set(w) == set(_NAS_KEYS):
        if w["base_acc"].shape != (1,):
            raise PredictorError(f"base_acc must hold one number, got shape {w['base_acc'].shape}")
        hidden = [(f"layers.{i}.0.weight", f"layers.{i}.0.bias") for i in range(3)]
        first, last, base, layout = _first_layer_nas, (w["layers.3.weight"], np.zeros(1, np.float32)), \
            float(w["base_acc"][0]), "ofa.nas.accuracy_predictor"
    elif set(w) == set(_TUTORIAL_KEYS):
        hidden = [(f"{i}.weight", f"{i}.bias") for i in (0, 2, 4)]
        first, last, base, layout = _first_layer_tutorial, (w["6.weight"], w["6.bias"]), 0.0, "ofa.tutorial"
    else:
        raise PredictorError(f"not a reference AccuracyPredictor state dict: its keys {sorted(w)[:4]} are neither "
                             f"{_NAS_KEYS[:2] + ['...', 'base_acc']} (ofa.nas) nor {_TUTORIAL_KEYS[:2] + ['...']} "
                             "(the tutorial's acc_predictor.pth)")
    if any(w[k].ndim != 2 for k, _ in hidden) or last[0].ndim != 2:
        raise PredictorError("the reference predictor's weights must be matrices")
    layers = [(first(w[hidden[0][0]], space), w[hidden[0][1]])]
    layers += [(w[k].T.copy(), w[b]) for k, b in hidden[1:]]
    layers.append((last[0].T * np.float32(scale), last[1] * np.float32(scale)))
    pred = AccuracyPredictor(space_digest(space), REFERENCE_FAMILY, (tuple(layers),), base * scale,
                             {"imported": {**(source or {}), "layout": layout}, "scale": scale})
    return AccuracyPredictor.from_bytes(pred.to_bytes(), space, "the imported reference predictor")  # checked
