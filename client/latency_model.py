"""The end-to-end latency model over a table's blocks: families, fit, choice by held-out error (numpy only:
``ofa profile`` and the light client's ``ofa-client profile`` fit with the same code).

Blocks timed alone miss what a whole network adds or saves: each timed block pays one
runtime call (a subnet pays one in all), caches stay warm within a network, some
stages run faster or slower in company than alone. So the prediction is a model over
the table's entries, fitted on subnets timed end to end in the same interleaved
passes. Every family is linear in the features of
:meth:`~ofa.predict.latency.LatencyPredictor.features` — (stem + first block + head),
each stage's summed entries, the number of active blocks, one column per resolution —
and all of them fold into the same general form, so the prediction stays a sum over
blocks (the search's one gather and its exact lower bounds)::

    fixed_scale · fixed + Σ_stage stage_scale[s] · stage_sum[s] + block_ms · blocks + offset_ms[resolution]

Fits minimise relative error (what "within ±10%" measures). The family is the one with
the lowest cross-validated error on the fitted subnets, the simpler one when two are
within :data:`TIE` of each other; its quality is then measured on held-out subnets.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .timing import spearman

__all__ = ["FAMILIES", "MIN_PREDICTED_MS", "choose_and_fit", "fit_and_check", "quality"]

# Simplest first. Each names which of the general coefficients it frees.
FAMILIES = ("sum", "scale", "scale+blocks", "stages+blocks", "stages+blocks+resolution")
FOLDS = 5
TIE = 0.002      # cross-validated mean |relative error| this close to the best counts as equal
RIDGE = 1e-4     # pulls free coefficients gently toward "the sum as timed" (scale 1, no offsets)
MIN_PREDICTED_MS = 1e-3  # a fitted model never predicts a subnet as free


def _design(family: str, num_stages: int, num_res: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, c0) with the general coefficients = M @ theta + c0 for the family's parameters theta.

    General coefficient order: fixed_scale, stage_scale[num_stages], block_ms, offset_ms[num_res].
    """
    n = 1 + num_stages + 1 + num_res
    scales, block, offsets = slice(0, 1 + num_stages), 1 + num_stages, slice(2 + num_stages, n)
    c0 = np.zeros(n)
    if family == "sum":
        c0[scales] = 1.0
        return np.zeros((n, 0)), c0
    if family in ("scale", "scale+blocks"):
        cols = [np.r_[np.ones(1 + num_stages), np.zeros(1 + num_res)]]
        if family == "scale+blocks":
            cols.append(np.eye(n)[block])
        cols.append(np.r_[np.zeros(2 + num_stages), np.ones(num_res)])
        return np.stack(cols, axis=1), c0
    if family == "stages+blocks":
        m = np.zeros((n, num_stages + 3))
        m[: 2 + num_stages, : 2 + num_stages] = np.eye(2 + num_stages)
        m[offsets, -1] = 1.0
        return m, c0
    if family == "stages+blocks+resolution":  # the fixed parts' scale is then one with the offsets: held at 1
        c0[0] = 1.0
        return np.eye(n)[:, 1:], c0
    raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")


def _fit(family: str, x: np.ndarray, y: np.ndarray, num_stages: int) -> np.ndarray:
    """General coefficients of ``family`` fitted to features ``x`` and timings ``y`` (relative error)."""
    num_res = x.shape[1] - num_stages - 2
    m, c0 = _design(family, num_stages, num_res)
    if m.shape[1] == 0:
        return c0
    prior = np.r_[np.ones(1 + num_stages), np.zeros(1 + num_res)]
    theta_prior = np.linalg.lstsq(m, prior - c0, rcond=None)[0]
    a = (x @ m) / y[:, None]
    b = (y - x @ c0) / y
    lam = RIDGE * len(y)
    lhs = np.vstack([a, np.sqrt(lam) * np.eye(m.shape[1])])
    rhs = np.r_[b, np.sqrt(lam) * theta_prior]
    theta = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    coef = m @ theta + c0
    coef[: 1 + num_stages] = np.maximum(coef[: 1 + num_stages], 1e-3)  # scales stay > 0: monotone in each block
    return coef


def _errors(coef: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(x @ coef, 1e-3) / y - 1


def quality(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """How predictions meet timings: share within ±10%, Spearman, mean and worst |relative error|."""
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    rel = np.abs(predicted / measured - 1)
    return {"subnets": int(len(rel)), "within_10pct": round(float(np.mean(rel <= 0.10)), 4),
            "spearman": round(spearman(predicted, measured), 4) if len(rel) >= 3 else 0.0,
            "mean_abs_rel_error": round(float(rel.mean()), 5), "worst_abs_rel_error": round(float(rel.max()), 5)}


def choose_and_fit(x: np.ndarray, y: np.ndarray, num_stages: int, seed: int = 0,
                   families: Sequence[str] = FAMILIES) -> tuple[str, np.ndarray, dict[str, float]]:
    """The family with the lowest cross-validated mean |relative error|, fitted on all of ``x``, ``y``;
    also each family's CV error."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    folds = np.array_split(np.random.default_rng(seed).permutation(len(y)), min(FOLDS, len(y)))
    cv = {}
    for family in families:
        errs = []
        for fold in folds:
            train = np.setdiff1d(np.arange(len(y)), fold)
            errs.append(np.abs(_errors(_fit(family, x[train], y[train], num_stages), x[fold], y[fold])))
        cv[family] = round(float(np.concatenate(errs).mean()), 5)
    best = min(cv.values())
    chosen = next(f for f in families if cv[f] <= best + TIE)
    return chosen, _fit(chosen, x, y, num_stages), cv


def model_dict(family: str, coef: np.ndarray, num_stages: int, resolutions: Sequence[int]) -> dict[str, Any]:
    """The table's ``model`` object for general coefficients ``coef``."""
    return {"family": family, "fixed_scale": round(float(coef[0]), 6),
            "stage_scale": [round(float(c), 6) for c in coef[1 : 1 + num_stages]],
            "block_ms": round(float(coef[1 + num_stages]), 6),
            "offset_ms": {str(r): round(float(c), 6) for r, c in zip(resolutions, coef[2 + num_stages :])}}


def identity_model(num_stages: int, resolutions: Sequence[int]) -> dict[str, Any]:
    """The model that predicts the sum of the entries as timed."""
    return model_dict("sum", _design("sum", num_stages, len(resolutions))[1], num_stages, resolutions)


def coefficients(model: Mapping[str, Any], resolutions: Sequence[int]) -> np.ndarray:
    """The general coefficient vector of a table's ``model``."""
    return np.r_[model["fixed_scale"], model["stage_scale"], model["block_ms"],
                 [model["offset_ms"][str(r)] for r in resolutions]].astype(float)


def fit_and_check(x: np.ndarray, y: np.ndarray, held: np.ndarray, num_stages: int, resolutions: Sequence[int],
                  seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """A table's ``model`` fitted on the subnets not ``held`` out, and its ``fit`` record (the quality on the
    fitted and the held-out subnets). With too few to choose a family: the entries' sum, checked on all."""
    if (~held).sum() < 2 * FOLDS:
        model = identity_model(num_stages, resolutions)
        return model, {"subnets": 0, "held_out": len(y), "cv": {},
                       "quality": {"held_out": quality(x @ coefficients(model, resolutions), y)}}
    family, coef, cv = choose_and_fit(x[~held], y[~held], num_stages, seed)
    model = model_dict(family, coef, num_stages, resolutions)
    # checked as the server predicts: the table's (rounded) coefficients, never below MIN_PREDICTED_MS
    pred = np.maximum(x @ coefficients(model, resolutions), MIN_PREDICTED_MS)
    fit = {"subnets": int((~held).sum()), "held_out": int(held.sum()), "cv": cv,
           "quality": {"fit": quality(pred[~held], y[~held])}}
    if held.any():
        fit["quality"]["held_out"] = quality(pred[held], y[held])
    return model, fit
