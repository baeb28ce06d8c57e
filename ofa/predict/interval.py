"""How sure a predicted accuracy is: a conformal interval that widens away from what was measured.

A predictor fitted on a few dozen measured subnets is trustworthy near them and guesses far
from them; a search that maximises the point prediction walks to where a linear model
extrapolates highest (a demo once served a subnet predicted at 80.7% when every measured
subnet was at most 78.7%, and it tested at 77.6%). So each prediction carries

* a **distance**: how many arch choices (a block's kernel or expand ratio, a stage's depth
  switching a block on or off, the resolution) separate the arch from the nearest measured
  subnet the predictor was fitted on;
* an **interval** ``prediction ± q·(1 + distance/kappa)``: normalised split-conformal
  prediction (Papadopoulos et al. 2008; Lei et al. 2018), calibrated on the cross-validation's
  out-of-fold residuals, each scaled by its own distance to the fold it was predicted from.
  For exchangeable data it covers a new measurement with probability >= ``level``; its
  coverage on the held-out subnets is measured and recorded, never assumed;
* an **extrapolated** flag: farther from every measured subnet than any calibration point
  was, or predicted above the best accuracy ever measured.

Chosen over an ensemble's spread because it is calibrated by construction (an ensemble of
ridge fits on 30 points agrees with itself far from the data, exactly where it is wrong),
and over a Gaussian-process variance because it needs no kernel choice and costs one
matrix product per generation of the search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = ["DEFAULT_LEVEL", "Interval", "choice_distance", "conformal_interval", "share_within"]

DEFAULT_LEVEL = 0.9  # the nominal coverage of a served interval
KAPPAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 1000.0)  # arch choices per extra q of width (1000: ~constant)
METHOD = "normalised split-conformal on out-of-fold residuals, growth chosen by width"


def share_within(half_width: float, level: float, points: float) -> float:
    """How often a measurement lands within ``points`` of its prediction, as an interval of ``half_width`` at
    ``level`` states it: a normal error whose sigma is the half-width over the level's two-sided quantile. The
    answers' own promise, to set beside a measured share (a 90% half-width of 1.64 points: 68% within 1)."""
    if half_width <= 0:
        return 1.0
    sigma = half_width / NormalDist().inv_cdf((1 + level) / 2)
    return 2 * NormalDist().cdf(points / sigma) - 1


def choice_distance(x: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(N,) number of arch choices between each row of one-hot features ``x`` and its nearest row of
    ``anchors`` (half the L1 distance of the binary features: one changed choice moves two ones)."""
    x = np.asarray(x, np.float32)
    a = np.asarray(anchors, np.float32)
    if len(a) == 0:
        return np.full(len(x), np.inf)
    l1 = x.sum(1)[:, None] + a.sum(1)[None, :] - 2.0 * (x @ a.T)
    return np.maximum(l1.min(1), 0.0) / 2.0


@dataclass(frozen=True)
class Interval:
    """The calibrated interval of one predictor (see the module's docstring)."""

    level: float
    q: float  # conformal quantile of |residual| / (1 + distance / kappa), in accuracy points
    kappa: float  # distance scale, in choices (the median out-of-fold distance)
    max_distance: float  # the largest out-of-fold distance calibrated on
    max_measured: float  # the highest measured accuracy (%) the predictor was fitted on
    anchors: np.ndarray = field(repr=False)  # (M, F) uint8 features of those measured subnets
    info: dict[str, Any] = field(default_factory=dict)  # calibration size, method

    def distance(self, x: np.ndarray) -> np.ndarray:
        return choice_distance(x, self.anchors)

    def half_width(self, distance: np.ndarray) -> np.ndarray:
        return self.q * (1.0 + np.asarray(distance, float) / self.kappa)

    def extrapolated(self, prediction: np.ndarray, distance: np.ndarray) -> np.ndarray:
        """Whether each prediction lies outside what was measured (far from it, or above all of it)."""
        return (np.asarray(distance) > self.max_distance) | (np.asarray(prediction) > self.max_measured)

    def covered(self, x: np.ndarray, predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
        """Whether each measurement lies inside its prediction's interval."""
        return np.abs(np.asarray(measured, float) - predicted) <= self.half_width(self.distance(x))

    def to_meta(self) -> dict[str, Any]:
        return {"level": self.level, "q": self.q, "kappa": self.kappa, "max_distance": self.max_distance,
                "max_measured": self.max_measured, "info": self.info}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], anchors: np.ndarray, width: int) -> "Interval":
        """Rebuild from a predictor file's metadata and anchor tensor; a ValueError says what is wrong."""
        try:
            iv = cls(float(meta["level"]), float(meta["q"]), float(meta["kappa"]), float(meta["max_distance"]),
                     float(meta["max_measured"]), np.asarray(anchors, np.uint8), dict(meta.get("info", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"incomplete interval ({e})") from None
        numbers = (iv.q, iv.kappa, iv.max_distance, iv.max_measured)
        if not (0 < iv.level < 1 and all(math.isfinite(v) for v in numbers) and iv.q >= 0 and iv.kappa > 0):
            raise ValueError("interval: level must be in (0, 1), q >= 0, kappa > 0, every value finite")
        if iv.anchors.ndim != 2 or iv.anchors.shape[1] != width or len(iv.anchors) < 1:
            raise ValueError(f"interval anchors must be a (subnets, {width}) matrix")
        return iv


def conformal_interval(x: np.ndarray, y: np.ndarray, oof: np.ndarray, fold: np.ndarray,
                       level: float = DEFAULT_LEVEL) -> Interval:
    """Calibrate an :class:`Interval` from a cross-validation: features ``x`` and accuracies ``y`` of the
    measured subnets, their out-of-fold predictions ``oof`` and the fold each was left out in."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x, y, oof, fold = np.asarray(x, np.float32), np.asarray(y, float), np.asarray(oof, float), np.asarray(fold)
    dist = np.empty(len(y))
    for f in np.unique(fold):
        dist[fold == f] = choice_distance(x[fold == f], x[fold != f])
    rank = math.ceil((len(y) + 1) * level)  # the finite-sample quantile of split conformal prediction

    def quantile(kappa: float) -> float:  # too few points for this level: the largest score, stated as such
        scores = np.sort(np.abs(y - oof) / (1.0 + dist / kappa))
        return float(scores[min(rank, len(y)) - 1])

    # how fast the width grows with the distance is chosen, not assumed: the growth whose intervals are the
    # narrowest on the calibration subnets at the coverage asked (a flat residual picks a near-constant
    # width; measured subnets close to each other must not make every unmeasured one look far out)
    kappa = min(KAPPAS, key=lambda k: quantile(k) * float(np.mean(1.0 + dist / k)))
    q = quantile(kappa)
    return Interval(level, q, kappa, float(dist.max()), float(y.max()), (x > 0.5).astype(np.uint8),
                    {"method": METHOD, "calibration_subnets": len(y),
                     "exact_level": rank <= len(y)})
