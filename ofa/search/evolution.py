"""Evolutionary search over the predictors, vectorised: one batched scoring call per generation.

The population is a matrix of integer arch codes (``SearchSpace.encode``'s layout, with
latent values kept in the slots a stage's depth leaves out, as genes that a later depth
mutation may switch on). Each generation draws children by mutation (per block: kernel
and expand ratio; per stage: depth; the resolution) and uniform crossover from the top
``parent_ratio`` of the population, scores them all at once — exact MACs and params,
the target's latency table, then the accuracy predictor on the feasible ones — and
keeps the best, feasible before infeasible. What it maximises is the lower end of the predicted
accuracy's interval (:mod:`ofa.predict.interval`), not the point prediction: an arch far from
every measured subnet has a wide interval, so the search does not walk to where the predictor
extrapolates unless the gain outweighs that doubt. Nothing loops without bound: a generation
is a fixed number of array operations, and an infeasible constraint is found before the
search starts from exact lower bounds (every metric is a sum over blocks).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..space import Arch, SearchSpace
from .scorer import Constraints, Scorer, SearchSettings, UnknownTarget

__all__ = ["Candidate", "Constraints", "Infeasible", "Scorer", "SearchCancelled", "SearchResult",
           "SearchSettings", "UnknownTarget", "pareto_front", "search"]


class Infeasible(ValueError):
    """No subnet satisfies the constraints; ``field`` and ``achievable`` say the closest one can get."""

    def __init__(self, message: str, field: str, achievable: float) -> None:
        super().__init__(message)
        self.field, self.achievable = field, achievable

    def __reduce__(self):  # crosses process boundaries (the server searches in worker processes)
        return (type(self), (str(self), self.field, self.achievable))


class SearchCancelled(RuntimeError):
    """The caller's ``should_stop`` asked the search to stop (a cancelled or expired request)."""


@dataclass(frozen=True)
class Candidate:
    """One arch found by a search, with its predicted accuracy and exact cost (latency on the target, if any).

    ``accuracy_low``/``accuracy_high`` bound the prediction at the predictor's interval level (None for a
    predictor without an interval); ``extrapolated``: the arch lies outside what was measured;
    ``measured_distance``: arch choices to the nearest measured subnet (None without an interval)."""

    arch: Arch
    accuracy: float
    macs: int
    params: int
    latency_ms: float | None = None
    accuracy_low: float | None = None
    accuracy_high: float | None = None
    extrapolated: bool = False
    measured_distance: float | None = None

    def to_dict(self) -> dict:
        """The JSON form: id, arch, accuracy (with its interval), latency_ms, macs, params."""
        return {"id": self.arch.id, "arch": self.arch.to_dict(), "accuracy": self.accuracy,
                "accuracy_low": self.accuracy_low, "accuracy_high": self.accuracy_high,
                "extrapolated": self.extrapolated, "measured_distance": self.measured_distance,
                "latency_ms": self.latency_ms, "macs": self.macs, "params": self.params}


@dataclass(frozen=True)
class SearchResult:
    """The best candidate, and how long the search took and how many archs it scored."""

    best: Candidate
    seconds: float
    generations: int
    evaluated: int
    history: tuple[float, ...] = field(default=(), repr=False)  # best objective per generation


def _bounds(c: Constraints) -> list[tuple[str, float]]:
    return [(m, float(v)) for m, v in (("latency_ms", c.max_latency_ms), ("macs", c.max_macs),
                                       ("params", c.max_params)) if v is not None]


_FIELD = {"latency_ms": "max_latency_ms", "macs": "max_macs", "params": "max_params"}


class _Run:
    """One search's state: the scorer, the constraints and the RNG (never shared between requests)."""

    def __init__(self, scorer: Scorer, constraints: Constraints, target: str | None,
                 settings: SearchSettings, objective: str) -> None:
        settings.check()
        sp = scorer.space
        self.scorer, self.c, self.target, self.s = scorer, constraints, target, settings
        self.rng = np.random.default_rng(settings.seed)
        if constraints.max_latency_ms is not None and target is None:
            raise ValueError("max_latency_ms needs a target")
        if target is not None:
            scorer.latency_of(target)
        bad = sorted(set(constraints.resolutions) - set(sp.resolutions))
        if bad:
            raise ValueError(f"resolutions {bad} are not in the space; allowed: {list(sp.resolutions)}")
        self.res_idx = np.array(sorted(sp.resolutions.index(r) for r in constraints.resolutions)
                                if constraints.resolutions else range(len(sp.resolutions)), dtype=np.int64)
        self.objective = objective  # "accuracy" (max) or a cost metric (min)
        self.high = sp.code_choices()
        self.n_slots, self.n_stages = sp.num_slots, sp.num_stages
        self.evaluated = 0
        # (predicted accuracy, its lower bound) by network key: evolution comes back to ~30% of the archs it scores
        self._accuracy: dict[int, tuple[float, float]] = {}
        self.seeds = self._check_feasible()

    def _check_feasible(self) -> list[np.ndarray]:
        seeds = []
        for metric, bound in _bounds(self.c):
            low, code = self.scorer.lower_bound(metric, self.target, self.c.resolutions)
            if low > bound:
                unit = {"latency_ms": " ms", "macs": " MACs", "params": " parameters"}[metric]
                where = f" on target {self.target!r}" if metric == "latency_ms" else ""
                shown = f"{low:.4g}" if metric == "latency_ms" else f"{int(low):,}"
                raise Infeasible(f"{_FIELD[metric]} = {bound:g} is below the smallest achievable "
                                 f"{shown}{unit}{where}", _FIELD[metric], low)
            seeds.append(code)
        return seeds

    # ---- scoring -----------------------------------------------------------------
    def score(self, codes: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics of each row, the total relative constraint violation and the objective (higher is better)."""
        sc = self.scorer
        out = {"macs": sc.cost.macs(codes), "params": sc.cost.params(codes)}
        if self.target is not None:
            out["latency_ms"] = sc.latency_of(self.target)(codes)
        violation = np.zeros(len(codes))
        for metric, bound in _bounds(self.c):
            violation += np.maximum(out[metric] / bound - 1.0, 0.0)
        acc = np.full(len(codes), -np.inf)
        low = acc.copy()
        ok = violation == 0
        if self.objective == "accuracy" or self.c.min_accuracy is not None:
            # the predictor runs on rows that meet the cost bounds only (or on all, if none does)
            rows = ok if ok.any() else np.ones(len(codes), bool)
            acc[rows], low[rows] = self._predict_accuracy(codes[rows]).T
        if self.c.min_accuracy is not None:
            violation = violation + np.where(np.isfinite(acc), np.maximum(self.c.min_accuracy - acc, 0) / 100, 1.0)
        out["accuracy"] = acc
        out["violation"] = violation
        # what the search stands behind: the interval's lower end (the prediction itself without an interval)
        out["fitness"] = low if self.objective == "accuracy" else -out[self.objective].astype(float)
        self.evaluated += len(codes)
        return out

    def _predict_accuracy(self, codes: np.ndarray) -> np.ndarray:
        """(N, 2): each row's predicted accuracy and the lower end of its interval."""
        keys = _keys(self.scorer.space, codes).tolist()
        memo = self._accuracy
        if len(memo) > _MEMO_ENTRIES:  # a search at the limits scores ~2M archs: bound the memory
            memo.clear()
        new = [i for i, k in enumerate(keys) if k not in memo]
        if new:
            b = self.scorer.accuracy_bounds(codes[new])
            memo.update(zip((keys[i] for i in new), zip(b.prediction.tolist(), b.low.tolist())))
        return np.array([memo[k] for k in keys], dtype=float).reshape(len(keys), 2)

    @staticmethod
    def order(metrics: Mapping[str, np.ndarray]) -> np.ndarray:
        """Feasible rows first by fitness (best first), then the others by violation."""
        return np.lexsort((-metrics["fitness"], metrics["violation"]))

    # ---- variation ---------------------------------------------------------------
    def random_codes(self, n: int) -> np.ndarray:
        codes = (self.rng.random((n, self.high.size)) * self.high).astype(np.int64)
        codes[:, -1] = self.res_idx[self.rng.integers(0, len(self.res_idx), n)]
        return codes

    def mutate(self, parents: np.ndarray) -> np.ndarray:
        s, n = self.n_slots, len(parents)
        kids = parents.copy()
        fresh = self.random_codes(n)
        block = self.rng.random((n, s)) < self.s.mutate_prob  # kernel and expand ratio mutate together
        kids[:, :s] = np.where(block, fresh[:, :s], kids[:, :s])
        kids[:, s : 2 * s] = np.where(block, fresh[:, s : 2 * s], kids[:, s : 2 * s])
        stage = self.rng.random((n, self.n_stages)) < self.s.mutate_prob
        kids[:, 2 * s : -1] = np.where(stage, fresh[:, 2 * s : -1], kids[:, 2 * s : -1])
        res = self.rng.random(n) < self.s.resolution_mutate_prob
        kids[:, -1] = np.where(res, fresh[:, -1], kids[:, -1])
        return kids

    def crossover(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(self.rng.random(a.shape) < 0.5, a, b)

    def initial(self, population: int) -> np.ndarray:
        """Random archs, plus the cheapest arch of each bound and mutations of it, so that some are feasible."""
        codes = self.random_codes(population)
        seeds = [c for c in self.seeds]
        if seeds:
            base = np.stack(seeds)
            extra = self.mutate(base[self.rng.integers(0, len(base), population // 2)])
            codes = np.concatenate([base, extra, codes])[:population]
        return codes


_HASH = np.random.default_rng(20201).integers(1, 2**62, size=512, dtype=np.int64)
_MEMO_ENTRIES = 200_000  # predictions a search remembers (~20 MiB), more than a default search scores


def _keys(space: SearchSpace, codes: np.ndarray) -> np.ndarray:
    """One int64 per row, equal for rows that are the same network (latent genes ignored)."""
    active = space.active_mask(codes)
    s = space.num_slots
    canon = codes + 1
    canon[:, :s] *= active
    canon[:, s : 2 * s] *= active
    return canon @ _HASH[: codes.shape[1]]  # wraps modulo 2**64: a hash, collisions ~2**-64


def _evolve(run: _Run, population: np.ndarray, generations: int,
            should_stop: Callable[[], bool] | None) -> tuple[np.ndarray, dict, list[float]]:
    s, space = run.s, run.scorer.space
    _, first = np.unique(_keys(space, population), return_index=True)
    population = population[np.sort(first)]
    metrics = run.score(population)
    order = run.order(metrics)[: s.population]
    population, metrics = population[order], {k: v[order] for k, v in metrics.items()}
    n_parents = max(1, int(round(s.parent_ratio * s.population)))
    n_mut = int(round(s.mutation_ratio * s.population))
    history = []
    for _ in range(generations):
        if should_stop is not None and should_stop():
            raise SearchCancelled("the search was cancelled")
        parents, parent_metrics = population[:n_parents], {k: v[:n_parents] for k, v in metrics.items()}
        pick = run.rng.integers(0, len(parents), (s.population, 2))
        kids = np.concatenate([run.mutate(parents[pick[:n_mut, 0]]),
                               run.crossover(parents[pick[n_mut:, 0]], parents[pick[n_mut:, 1]])])
        # only networks not already among the parents (nor twice among the kids) are scored
        keys, first = np.unique(_keys(space, kids), return_index=True)
        first = first[~np.isin(keys, _keys(space, parents))]
        kids = kids[np.sort(first)]
        kid_metrics = run.score(kids)
        both = {k: np.concatenate([parent_metrics[k], kid_metrics[k]]) for k in metrics}
        order = run.order(both)[: s.population]
        population = np.concatenate([parents, kids])[order]
        metrics = {k: v[order] for k, v in both.items()}
        history.append(float(metrics["fitness"][0]) if metrics["violation"][0] == 0 else float("nan"))
    return population, metrics, history


def _up(ms: float) -> float:
    """A predicted latency as answered: to 0.1 us, rounded *up*, so that a client may send it back as a bound
    (rounded to nearest, the fastest subnet's 0.34414 ms read 0.3441, below the smallest achievable)."""
    return math.ceil(round(ms * 1e4, 6)) / 1e4


def _candidate(run: _Run, codes: np.ndarray, metrics: Mapping[str, np.ndarray], i: int) -> Candidate:
    lat = metrics.get("latency_ms")
    arch = run.scorer.space.decode(codes[i : i + 1])[0]
    cost = dict(macs=int(metrics["macs"][i]), params=int(metrics["params"][i]),
                latency_ms=None if lat is None else _up(float(lat[i])))
    if run.scorer.accuracy is None:
        return Candidate(arch, float("nan"), **cost)
    b = run.scorer.accuracy_bounds(codes[i : i + 1])
    interval = run.scorer.accuracy.interval is not None
    return Candidate(arch, round(float(b.prediction[0]), 4), **cost,
                     accuracy_low=round(float(b.low[0]), 4) if interval else None,
                     accuracy_high=round(float(b.high[0]), 4) if interval else None,
                     extrapolated=bool(b.extrapolated[0]),
                     measured_distance=float(b.distance[0]) if interval else None)


def _infeasible_after_search(run: _Run, metrics: Mapping[str, np.ndarray]) -> Infeasible:
    if run.c.min_accuracy is not None:
        best = float(np.nanmax(np.where(np.isfinite(metrics["accuracy"]), metrics["accuracy"], np.nan)))
        return Infeasible(f"min_accuracy = {run.c.min_accuracy:g} is above the highest predicted accuracy "
                          f"found within the other constraints, {best:.2f}%", "min_accuracy", best)
    return Infeasible("no subnet meets all the constraints together (each is reachable alone)",
                      "constraints", float(metrics["violation"][0]))


def search(scorer: Scorer, constraints: Constraints = Constraints(), target: str | None = None,
           settings: SearchSettings = SearchSettings(),
           should_stop: Callable[[], bool] | None = None) -> SearchResult:
    """The best arch under ``constraints``: highest predicted accuracy, or with ``min_accuracy`` the lowest
    latency on ``target`` (MACs without a target). Raises :class:`Infeasible` at once when a bound is
    below the exact minimum, and after the search when no candidate met everything together."""
    t0 = time.perf_counter()
    if constraints.min_accuracy is not None:
        objective = "latency_ms" if target is not None else "macs"
    else:
        objective = "accuracy"
    run = _Run(scorer, constraints, target, settings, objective)
    population, metrics, history = _evolve(run, run.initial(settings.population), settings.generations, should_stop)
    if metrics["violation"][0] > 0:
        raise _infeasible_after_search(run, metrics)
    return SearchResult(_candidate(run, population, metrics, 0), time.perf_counter() - t0,
                        settings.generations, run.evaluated, tuple(history))


def pareto_front(scorer: Scorer, k: int = 10, target: str | None = None, constraints: Constraints = Constraints(),
                 settings: SearchSettings = SearchSettings(generations=100),
                 should_stop: Callable[[], bool] | None = None) -> list[Candidate]:
    """Up to ``k`` non-dominated archs on the accuracy–latency front (accuracy–MACs without a target),
    sorted by cost, from ``k`` budget-constrained searches spaced between the cheapest and the largest
    arch, each starting from the previous one's population."""
    if not 1 <= k <= 100:
        raise ValueError(f"k must be in 1..100, got {k}")
    metric = "latency_ms" if target is not None else "macs"
    field_name = _FIELD[metric]
    probe = _Run(scorer, constraints, target, settings, "accuracy")
    low, _ = scorer.lower_bound(metric, target, constraints.resolutions)
    sp = scorer.space
    largest = sp.encode([sp.largest(max(constraints.resolutions or sp.resolutions))])
    high = float(probe.score(largest)[metric][0])
    bound = getattr(constraints, field_name)
    if bound is not None:
        high = min(high, float(bound))
    budgets = np.geomspace(max(low, 1e-9), high, k) if k > 1 else np.array([high])
    population = None
    found: list[tuple[np.ndarray, dict, int]] = []
    for budget in budgets:
        value = float(budget) if metric == "latency_ms" else int(np.floor(budget))
        c = Constraints(**{**constraints.__dict__, field_name: value})
        run = _Run(scorer, c, target, settings, "accuracy")
        start = run.initial(settings.population) if population is None else np.concatenate(
            [population, run.initial(settings.population)])
        population, metrics, _ = _evolve(run, start, settings.generations, should_stop)
        if metrics["violation"][0] == 0:
            found.append((population, metrics, 0))
    cands = {}
    for population, metrics, i in found:
        cand = _candidate(probe, population, metrics, i)
        cands[cand.arch.id] = cand
    def stood_behind(c: Candidate) -> float:  # what the searches maximised
        return c.accuracy if c.accuracy_low is None else c.accuracy_low

    points = sorted(cands.values(), key=lambda c: (getattr(c, metric), -stood_behind(c)))
    front, best_acc = [], -np.inf
    for cand in points:  # sorted by cost: keep each that is more accurate than every cheaper one
        if stood_behind(cand) > best_acc:
            front.append(cand)
            best_acc = stood_behind(cand)
    return front
