"""From the validation split to the test distribution: the measured shift of accuracy between them.

The predictor is fitted on a validation split held out of the *training* images. On
Fashion-MNIST that split is easier than the official test split by about a point, for every
model: the supernet's subnets scored 0.5-1.2 points lower on test than on validation (12 of
12 served subnets over 2 demo runs), and so did a plain 2-layer MLP on raw pixels (-0.7 to
-1.2 points, 3 seeds), and the validation images lie no nearer to the training images than
the test images do (nearest-neighbour distances equal at every quantile). It is a property of
the data, so no predictor fitted on validation accuracy can know it: it must be measured on
images of the test distribution.

So when the dataset has a test split, a seeded half of it (:func:`ofa.data.split_test`, the
*shift half*) is measured for the subnets where the search serves from, and

* the **offset** is the mean of (shift-half accuracy - validation accuracy) over them;
* its **standard error** comes from the image sampling of both splits, over the images'
  correctness averaged across those subnets (the subnets share their hard images, so the
  error does not shrink with more subnets), plus the offset's spread across subnets;
* a served accuracy is then checked on the other half (the *evaluation half*) only, whose own
  sampling noise (``p(1 - p) / n``) the interval includes: it states the accuracy a
  measurement on that many test images will show.

Every predicted accuracy is the validation prediction plus the offset, and its interval the
conformal half-width combined with the shift's (root sum of squares: independent errors).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = ["Shift", "estimate_shift"]

METHOD = "offset on the test split's shift half, sigma from image sampling, spread and evaluation"
MIN_SUBNETS = 3  # fewer measured on the shift half: no offset (one subnet's gap is mostly its own noise)


@dataclass(frozen=True)
class Shift:
    """How the accuracy on the test distribution differs from the validation accuracy (points)."""

    offset: float  # mean test-distribution minus validation accuracy
    sigma: float  # standard deviation of one served subnet's error from the shift: estimate, spread, evaluation
    level: float  # the coverage the half-width is stated at
    info: dict[str, Any]  # subnets, images, parts of sigma

    @functools.cached_property  # read every search generation: the normal quantile once
    def half_width(self) -> float:
        return NormalDist().inv_cdf((1 + self.level) / 2) * self.sigma

    def to_meta(self) -> dict[str, Any]:
        return {"offset": self.offset, "sigma": self.sigma, "level": self.level, "info": self.info}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Shift":
        """Rebuild from a predictor file's metadata; a ValueError says what is wrong."""
        try:
            shift = cls(float(meta["offset"]), float(meta["sigma"]), float(meta["level"]), dict(meta.get("info", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"incomplete shift ({e})") from None
        if not (math.isfinite(shift.offset) and math.isfinite(shift.sigma) and shift.sigma >= 0
                and abs(shift.offset) <= 100 and 0 < shift.level < 1):
            raise ValueError("shift: offset must be a finite number of points, sigma >= 0, level in (0, 1)")
        return shift


def estimate_shift(val_correct: np.ndarray, shift_correct: np.ndarray, eval_images: int,
                   level: float) -> Shift | None:
    """The :class:`Shift` from per-image correctness (bool) of the same subnets on the validation split
    (subnets, val images) and on the shift half (subnets, shift images); ``eval_images`` is the size of the
    evaluation half a served accuracy is checked on. None below :data:`MIN_SUBNETS` subnets."""
    v, s = np.asarray(val_correct, float), np.asarray(shift_correct, float)
    if v.ndim != 2 or s.ndim != 2 or len(v) != len(s):
        raise ValueError("val_correct and shift_correct must be (subnets, images) matrices of the same subnets")
    if len(v) < MIN_SUBNETS:
        return None
    gaps = 100.0 * (s.mean(1) - v.mean(1))
    # the offset's error from sampling images: per-image correctness averaged over the subnets, var / n
    se = 100.0 * math.sqrt(v.mean(0).var(ddof=1) / v.shape[1] + s.mean(0).var(ddof=1) / s.shape[1])
    spread = float(gaps.std(ddof=1))  # one subnet's gap around the mean (its own sampling noise included)
    p = float(s.mean())
    evaluation = 100.0 * math.sqrt(p * (1 - p) / max(eval_images, 1))
    sigma = math.sqrt(se ** 2 + spread ** 2 + evaluation ** 2)
    info = {"subnets": int(len(v)), "val_images": int(v.shape[1]), "shift_images": int(s.shape[1]),
            "eval_images": int(eval_images), "standard_error": round(se, 4), "spread": round(spread, 4),
            "evaluation_noise": round(evaluation, 4), "gaps": [round(float(g), 4) for g in gaps]}
    return Shift(round(float(gaps.mean()), 4), round(sigma, 4), level, info)
