"""What a search scores with: the constraints, the evolution's settings, and the :class:`Scorer`
that holds every predictor of one artifact (exact cost, latency tables, accuracy) over arch codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..predict.accuracy import AccuracyPredictor, Bounds
from ..predict.cost import CostModel
from ..predict.latency import LatencyPredictor
from ..space import SearchSpace

__all__ = ["Constraints", "Scorer", "SearchSettings", "UnknownTarget"]


class UnknownTarget(LookupError):
    """A target with no latency table in the artifact."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Constraints:
    """Upper bounds (``None``: free), allowed resolutions (empty: all) and a floor on accuracy.

    With ``min_accuracy`` the search minimises latency on the target (MACs without one)
    among the subnets predicted at least that accurate; otherwise it maximises accuracy.
    """

    max_latency_ms: float | None = None
    max_macs: int | None = None
    max_params: int | None = None
    resolutions: tuple[int, ...] = ()
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        """A bound that no comparison can honour (nan, inf, <= 0) is a ValueError naming its field (nan passed
        every comparison and answered as if unbounded)."""
        for name, high in (("max_latency_ms", 1e6), ("max_macs", 1e15), ("max_params", 1e15)):
            v = getattr(self, name)
            if v is not None and not 0 < v <= high:
                raise ValueError(f"{name} must be a number in (0, {high:g}], got {v!r}")
        # a finite floor above every prediction is Infeasible when searched, not refused here
        if self.min_accuracy is not None and not -1e6 <= self.min_accuracy <= 1e6:
            raise ValueError(f"min_accuracy must be a finite number, got {self.min_accuracy!r}")


@dataclass(frozen=True)
class SearchSettings:
    """Regularised evolution's knobs; the defaults are the reference's (100 × 500)."""

    population: int = 100
    generations: int = 500
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    mutate_prob: float = 0.1
    resolution_mutate_prob: float = 0.5
    seed: int = 0

    def check(self) -> None:
        """Raise a ValueError naming every setting out of its range."""
        problems = []
        if not 2 <= self.population <= 10_000:
            problems.append(f"population must be in 2..10000, got {self.population}")
        if not 0 <= self.generations <= 100_000:
            problems.append(f"generations must be in 0..100000, got {self.generations}")
        if not 0 <= self.seed < 2**64:
            problems.append(f"seed must be an integer in 0..2**64-1, got {self.seed}")
        for name in ("parent_ratio", "mutation_ratio", "mutate_prob", "resolution_mutate_prob"):
            v = getattr(self, name)
            lo = 0.0 if name != "parent_ratio" else 1e-9
            if not (lo <= v <= 1.0):
                problems.append(f"{name} must be in {'(0' if lo else '[0'}, 1], got {v}")
        if problems:
            raise ValueError("; ".join(problems))



class Scorer:
    """Every predictor of one artifact over encoded archs: exact cost, latency tables, accuracy."""

    def __init__(self, space: SearchSpace, accuracy: AccuracyPredictor | None,
                 latency: Mapping[str, LatencyPredictor] | None = None, refused: Mapping[str, str] | None = None) -> None:
        self.space, self.accuracy = space, accuracy
        self.cost = CostModel(space)
        self.latency = dict(latency or {})
        self.refused = dict(refused or {})  # target -> why its table was not loaded

    def predict_accuracy(self, codes: np.ndarray) -> np.ndarray:
        """Predicted top-1 accuracy (%) of each row of ``codes``; a ValueError without a predictor."""
        if self.accuracy is None:
            raise ValueError("this artifact has no accuracy predictor; fit one with `ofa predictors`")
        return self.accuracy.predict(self.space, codes)

    def accuracy_bounds(self, codes: np.ndarray) -> Bounds:
        """Predicted accuracy of each row of ``codes`` with its interval and extrapolation flag."""
        if self.accuracy is None:
            raise ValueError("this artifact has no accuracy predictor; fit one with `ofa predictors`")
        return self.accuracy.bounds(self.space, codes)

    def latency_of(self, target: str) -> LatencyPredictor:
        """The latency table of ``target``; :class:`UnknownTarget` says why there is none."""
        if target not in self.latency:
            if target in self.refused:
                raise UnknownTarget(f"target {target!r} cannot be used: {self.refused[target]}")
            raise UnknownTarget(f"target {target!r} has no latency table in this artifact; known targets: "
                                f"{sorted(self.latency) or 'none (profile one with `ofa profile`)'}")
        return self.latency[target]

    def lower_bound(self, metric: str, target: str | None, resolutions: tuple[int, ...]) -> tuple[float, np.ndarray]:
        """The exact minimum of ``metric`` (latency_ms, macs, params) over archs at ``resolutions``, and one arch's code reaching it."""
        sp = self.space
        res_idx = [sp.resolutions.index(r) for r in resolutions] if resolutions else list(range(len(sp.resolutions)))
        if metric == "latency_ms":
            pred = self.latency_of(target)
            slot, fixed, finish = pred.slot_ms, pred.fixed_ms, pred.finish
        elif metric == "macs":
            slot, fixed, finish = self.cost.slot_macs, self.cost.fixed_macs, None
        else:
            slot = np.broadcast_to(self.cost.slot_params, (len(sp.resolutions),) + self.cost.slot_params.shape)
            fixed, finish = np.full(len(sp.resolutions), self.cost.fixed_params), None
        best_value, best_code = np.inf, None
        n_k, n_e, md = len(sp.kernel_choices), len(sp.expand_choices), sp.max_depth
        for ri in res_idx:
            flat = slot[ri].reshape(sp.num_slots, n_k * n_e)
            choice = flat.argmin(1)
            per_slot = flat[np.arange(sp.num_slots), choice].reshape(sp.num_stages, md)
            code = np.zeros(sp.code_length, dtype=np.int64)
            code[: sp.num_slots], code[sp.num_slots : 2 * sp.num_slots] = np.divmod(choice, n_e)
            total = float(fixed[ri])
            for s in range(sp.num_stages):
                sums = [per_slot[s, :d].sum() for d in sp.depth_choices]
                di = int(np.argmin(sums))
                code[2 * sp.num_slots + s] = di
                total += float(sums[di])
            code[-1] = ri
            value = float(finish(np.array([total]))[0]) if finish is not None else total
            if value < best_value:
                best_value, best_code = value, code
        return best_value, best_code
