"""Accuracy predictor: measured subnets → a model that scores 10,000 encoded archs in one call.

Features are the reference's arch encoding, built vectorised from the integer codes:
``[resolution one-hot | kernel one-hot per block slot | expand one-hot per block slot]``
with all-zero one-hots for the slots a stage's depth leaves out. Every model family is
stored as the same thing — members, each a stack of dense layers with ReLU between —
whose prediction is the members' mean plus a base accuracy. Scoring needs numpy only;
fitting the MLPs imports torch lazily.

The file (``accuracy_predictor.safetensors``) holds the layer tensors and one metadata
key, ``ofa``, with canonical JSON (one key: safetensors writes several in a
per-process order, which would change the file's sha256 from run to run).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from ..space import SearchSpace
from .interval import DEFAULT_LEVEL, Interval, conformal_interval
from .shift import Shift

__all__ = ["AccuracyPredictor", "Bounds", "PredictorError", "arch_features", "fit_family", "fit_many", "kendall_tau", "tau_ceiling",
           "select_and_fit", "evaluate", "FAMILIES", "PREDICTOR_FORMAT"]

PREDICTOR_FORMAT = "ofa-accuracy-predictor"
PREDICTOR_VERSION = 1


class PredictorError(ValueError):
    """A predictor file that cannot be used; the message says why."""


def feature_length(space: SearchSpace) -> int:
    return len(space.resolutions) + space.num_slots * (len(space.kernel_choices) + len(space.expand_choices))


def arch_features(space: SearchSpace, codes: np.ndarray) -> np.ndarray:
    """(N, F) float32 one-hot features of N encoded archs (latent slots give zeros)."""
    codes = np.asarray(codes)
    n, s = len(codes), space.num_slots
    n_r, n_k, n_e = len(space.resolutions), len(space.kernel_choices), len(space.expand_choices)
    x = np.zeros((n, feature_length(space)), dtype=np.float32)
    x[np.arange(n), codes[:, -1]] = 1.0
    rows, slots = np.nonzero(space.active_mask(codes))
    x[rows, n_r + slots * n_k + codes[rows, slots]] = 1.0
    x[rows, n_r + s * n_k + slots * n_e + codes[rows, s + slots]] = 1.0
    return x


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b between two score vectors (ties counted as in scipy)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError("kendall_tau needs two 1-D arrays of the same length >= 2")
    i, j = np.triu_indices(len(a), 1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    concordant = float((da * db).sum())
    n_a, n_b = float((da != 0).sum()), float((db != 0).sum())
    if n_a == 0 or n_b == 0:
        return 0.0
    return concordant / np.sqrt(n_a * n_b)


def tau_ceiling(correct: np.ndarray, images: int | None = None) -> float:
    """The Kendall τ a predictor of the *true* accuracies could expect against a measurement.

    ``correct`` is (subnets, images), which images each subnet got right. For every pair
    of subnets, the chance that a measurement on another sample of ``images`` images (by
    default as many as given) orders the pair as this one does follows from the pair's
    per-image differences (a normal approximation, paired, so mistakes both make cancel);
    τ's expectation is the mean of 2p - 1 over pairs. The observed differences stand in
    for the true ones, so this is an upper bound: no predictor scored on such a
    measurement can expect more.
    """
    c = np.asarray(correct, dtype=np.float64)
    if c.ndim != 2 or len(c) < 2 or c.shape[1] < 2:
        raise ValueError("tau_ceiling needs (subnets >= 2, images >= 2) correctness")
    n_img = c.shape[1] if images is None else images
    if n_img < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    i, j = np.triu_indices(len(c), 1)
    agree = np.empty(len(i))
    for start in range(0, len(i), 4096):  # bounded memory: 4096 pairs x images at a time
        d = c[i[start : start + 4096]] - c[j[start : start + 4096]]
        mean, sd = d.mean(1), d.std(1, ddof=1)
        z = np.abs(mean) / np.maximum(sd / np.sqrt(n_img), 1e-12)
        p_same = 0.5 * (1 + _erf(z / np.sqrt(2)))
        agree[start : start + 4096] = np.where(mean == 0, 0.0, 2 * p_same - 1)  # a tie orders nothing
    return float(agree.mean())


_erf = np.vectorize(math.erf, otypes=[float])


Layers = tuple[tuple[np.ndarray, np.ndarray], ...]


class Bounds(NamedTuple):
    """Predictions of N archs with their uncertainty (all (N,) arrays): the point prediction, the interval
    (``low == high == prediction`` for a predictor without one), and whether each lies outside what was
    measured (distance in arch choices to the nearest measured subnet; inf without an interval)."""

    prediction: np.ndarray
    low: np.ndarray
    high: np.ndarray
    distance: np.ndarray
    extrapolated: np.ndarray


@dataclass(frozen=True)
class AccuracyPredictor:
    """Predicted top-1 accuracy (%) of encoded archs: mean of the members, plus ``base``; with an
    :class:`~ofa.predict.interval.Interval` when it was calibrated (every fit by :func:`select_and_fit`);
    with a :class:`~ofa.predict.shift.Shift` (set by ``ofa predictors`` where the dataset has a test split)
    every prediction is for the test distribution: the validation prediction plus the measured offset."""

    space_digest: str
    family: str
    members: tuple[Layers, ...]
    base: float
    info: dict[str, Any] = field(default_factory=dict)
    interval: Interval | None = None
    shift: Shift | None = None

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """(N,) predictions from (N, F) features."""
        return self._validation(x) + (self.shift.offset if self.shift is not None else 0.0)

    def _validation(self, x: np.ndarray) -> np.ndarray:
        """(N,) predictions of the validation accuracy the members were fitted on."""
        total = np.zeros(len(x), dtype=np.float64)
        for layers in self.members:
            h = x
            for i, (w, b) in enumerate(layers):
                h = h @ w + b
                if i + 1 < len(layers):
                    np.maximum(h, 0, out=h)
            total += h[:, 0]
        return total / len(self.members) + self.base

    def predict(self, space: SearchSpace, codes: np.ndarray) -> np.ndarray:
        """(N,) predicted accuracies (%) of N encoded archs of ``space``."""
        return self.predict_features(arch_features(space, codes))

    def bounds_features(self, x: np.ndarray) -> Bounds:
        """Predictions of (N, F) features with their intervals (with a shift: the conformal half-width and the
        shift's, combined as independent errors)."""
        val = self._validation(x)  # the members' forward pass, once: the search calls this every generation
        pred = val + (self.shift.offset if self.shift is not None else 0.0)
        if self.interval is None:
            return Bounds(pred, pred, pred, np.full(len(pred), np.inf), np.zeros(len(pred), bool))
        dist = self.interval.distance(x)
        half = self.interval.half_width(dist)
        if self.shift is not None:
            half = np.hypot(half, self.shift.half_width)
        return Bounds(pred, pred - half, pred + half, dist, self.interval.extrapolated(val, dist))

    def bounds(self, space: SearchSpace, codes: np.ndarray) -> Bounds:
        """Predictions of N encoded archs of ``space`` with their intervals."""
        return self.bounds_features(arch_features(space, codes))

    # ---- file format -----------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {f"m{m}.l{i}.{kind}": np.ascontiguousarray(t, dtype=np.float32)
                   for m, layers in enumerate(self.members) for i, (w, b) in enumerate(layers)
                   for kind, t in (("weight", w), ("bias", b))}
        meta = {"format": PREDICTOR_FORMAT, "version": PREDICTOR_VERSION, "space_digest": self.space_digest,
                "family": self.family, "members": len(self.members),
                "layers": [len(layers) for layers in self.members], "base": self.base, "info": self.info}
        if self.interval is not None:  # optional: a file without one (older, or imported) reads as before
            tensors["interval.anchors"] = np.ascontiguousarray(self.interval.anchors, dtype=np.uint8)
            meta["interval"] = self.interval.to_meta()
        if self.shift is not None:
            meta["shift"] = self.shift.to_meta()
        return save(tensors, metadata={"ofa": json.dumps(meta, sort_keys=True, separators=(",", ":"))})

    @classmethod
    def from_bytes(cls, data: bytes, space: SearchSpace | None = None, where: str = "predictor") -> "AccuracyPredictor":
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["ofa"])
        except (SafetensorError, ValueError, KeyError, TypeError) as e:
            raise PredictorError(f"{where} is not an accuracy predictor file: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != PREDICTOR_FORMAT:
            raise PredictorError(f"{where}: metadata format must be {PREDICTOR_FORMAT!r}")
        if meta.get("version") != PREDICTOR_VERSION:
            raise PredictorError(f"{where}: version {meta.get('version')!r} is not supported "
                                 f"(this build reads {PREDICTOR_VERSION})")
        try:
            members = tuple(
                tuple((tensors[f"m{m}.l{i}.weight"].astype(np.float32), tensors[f"m{m}.l{i}.bias"].astype(np.float32))
                      for i in range(int(n)))
                for m, n in enumerate(meta["layers"]))
            pred = cls(str(meta["space_digest"]), str(meta["family"]), members, float(meta["base"]),
                       dict(meta.get("info", {})))
            if "interval" in meta:
                pred = replace(pred, interval=Interval.from_meta(meta["interval"], tensors["interval.anchors"],
                                                                 members[0][0][0].shape[0]))
            if "shift" in meta:
                pred = replace(pred, shift=Shift.from_meta(meta["shift"]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise PredictorError(f"{where}: incomplete predictor ({e})") from None
        if not members or not all(members):
            raise PredictorError(f"{where}: layers must list at least one member, each of at least one layer; "
                                 f"got {meta['layers']!r}")
        if not math.isfinite(pred.base) or not all(np.isfinite(t).all() for layers in members
                                                   for layer in layers for t in layer):
            raise PredictorError(f"{where}: base and every weight must be finite numbers")
        for layers in members:
            width = None  # each layer's input width is the previous layer's output width
            for w, b in layers:
                if w.ndim != 2 or b.shape != (w.shape[1],) or width not in (None, w.shape[0]):
                    raise PredictorError(f"{where}: layer shapes do not chain")
                width = w.shape[1]
            if width != 1:
                raise PredictorError(f"{where}: the last layer must have one output")
        if space is not None:
            from ..space import space_digest

            if pred.space_digest != space_digest(space):
                raise PredictorError(f"{where} was fitted on another search space "
                                     f"(digest {pred.space_digest[:12]}, this space {space_digest(space)[:12]})")
            want = feature_length(space)
            if any(layers[0][0].shape[0] != want for layers in members):
                raise PredictorError(f"{where}: input width must be {want} for this space")
        return pred


# ---- fitting (offline; torch for the MLPs) ---------------------------------------
def _fit_ridge(data: Sequence[tuple[np.ndarray, np.ndarray]], alpha: float, seed: int) -> list[tuple[Layers, ...]]:
    out = []
    for x, y in data:
        x1 = np.concatenate([x, np.ones((len(x), 1), np.float32)], 1).astype(np.float64)
        reg = alpha * np.eye(x1.shape[1])
        reg[-1, -1] = 0.0  # the intercept is not shrunk
        coef = np.linalg.solve(x1.T @ x1 + reg, x1.T @ y)
        out.append((((coef[:-1, None].astype(np.float32), np.array([coef[-1]], np.float32)),),))
    return out


def _fit_mlp(data: Sequence[tuple[np.ndarray, np.ndarray]], hidden: int, depth: int, seed: int, members: int = 1,
             steps: int = 1500, lr: float = 3e-3, weight_decay: float = 1e-4) -> list[tuple[Layers, ...]]:
    """``members`` MLPs per dataset, all trained at once as one batch of independent networks.

    Each network starts as ``nn.Linear`` layers seeded by ``seed * 1000 + member`` would and
    trains full-batch with AdamW on its own dataset's mean squared error: the summed loss
    gives each network its own gradient, and AdamW works element by element, so this is
    the same training as one network at a time, at the per-call cost of one (the folds of a
    cross-validation and an ensemble's members took ~40 s one by one on 2 cores; together ~3 s).
    """
    import torch
    from torch import nn

    from .._torch import seeded

    nets = [(d, m) for d in range(len(data)) for m in range(members)]
    n_max = max(len(x) for x, _ in data)
    dims = [data[0][0].shape[1]] + [hidden] * depth + [1]
    xs = torch.zeros(len(nets), n_max, dims[0])
    ys = torch.zeros(len(nets), n_max)
    mask = torch.zeros(len(nets), n_max)
    weights: list[list[torch.Tensor]] = [[] for _ in dims[1:]]
    biases: list[list[torch.Tensor]] = [[] for _ in dims[1:]]
    for b, (d, m) in enumerate(nets):
        x, y = data[d]
        xs[b, : len(x)], ys[b, : len(x)], mask[b, : len(x)] = torch.from_numpy(x), torch.from_numpy(
            y.astype(np.float32)), 1.0 / len(x)
        with seeded(seed * 1000 + m):  # torch's init of each member, and the caller's generator as it was
            for i, (a, c) in enumerate(zip(dims, dims[1:])):
                lin = nn.Linear(a, c)
                weights[i].append(lin.weight.detach().T)
                biases[i].append(lin.bias.detach()[None, :])
    params = [torch.stack(w).requires_grad_() for w in weights] + [torch.stack(b).requires_grad_() for b in biases]
    ws, bs = params[: len(weights)], params[len(weights):]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        h = xs
        for i, (w, bias) in enumerate(zip(ws, bs)):
            h = torch.baddbmm(bias, h, w)
            if i < len(ws) - 1:
                h = torch.relu(h)
        loss = (((h[..., 0] - ys) ** 2) * mask).sum()  # each network's own mean, summed
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    out: list[list[Layers]] = [[] for _ in data]
    for b, (d, m) in enumerate(nets):
        out[d].append(tuple((w[b].detach().numpy().copy(), bias[b, 0].detach().numpy().copy())
                            for w, bias in zip(ws, bs)))
    return [tuple(members_) for members_ in out]


# name -> fit([(x, y_centred), ...], seed) -> members of each dataset's predictor
FAMILIES: dict[str, Callable[[Sequence[tuple[np.ndarray, np.ndarray]], int], list[tuple[Layers, ...]]]] = {
    "ridge-0.3": lambda d, s: _fit_ridge(d, 0.3, s),
    "ridge-3": lambda d, s: _fit_ridge(d, 3.0, s),
    "ridge-10": lambda d, s: _fit_ridge(d, 10.0, s),   # when the measurements are noisy,
    "ridge-30": lambda d, s: _fit_ridge(d, 30.0, s),   # as on fashion, more shrinkage ranks better
    "mlp-3x400": lambda d, s: _fit_mlp(d, 400, 3, s),          # the reference's predictor
    "mlp-ensemble-5x2x64": lambda d, s: _fit_mlp(d, 64, 2, s, members=5),
}


def fit_many(family: str, data: Sequence[tuple[np.ndarray, np.ndarray]], space_digest: str, seed: int = 0,
             info: dict[str, Any] | None = None) -> list[AccuracyPredictor]:
    """One predictor of ``family`` per (features, accuracy) dataset, fitted together."""
    if family not in FAMILIES:
        raise PredictorError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    bases = [float(np.mean(y)) for _, y in data]
    centred = [(np.asarray(x, np.float32), np.asarray(y, float) - base) for (x, y), base in zip(data, bases)]
    return [AccuracyPredictor(space_digest, family, members, base, dict(info or {}))
            for members, base in zip(FAMILIES[family](centred, seed), bases)]


def fit_family(family: str, x: np.ndarray, y: np.ndarray, space_digest: str, seed: int = 0,
               info: dict[str, Any] | None = None) -> AccuracyPredictor:
    return fit_many(family, [(x, y)], space_digest, seed, info)[0]


def _scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"kendall_tau": round(kendall_tau(pred, y), 4),
            "rmse": round(float(np.sqrt(np.mean((pred - y) ** 2))), 4),
            "mae": round(float(np.mean(np.abs(pred - y))), 4)}


FOLDS = 5  # cross-validation folds when selecting the family


def select_and_fit(x: np.ndarray, y: np.ndarray, space_digest: str, families: Sequence[str] | None = None,
                   folds: int = FOLDS, seed: int = 0, log: Callable[[str], None] = lambda s: None,
                   level: float = DEFAULT_LEVEL) -> tuple[AccuracyPredictor, dict[str, dict[str, float]]]:
    """Pick the family with the best ``folds``-fold cross-validated Kendall τ (then RMSE), fit it on all,
    and calibrate its interval at ``level`` on the chosen family's out-of-fold residuals.

    Returns the fitted predictor and each family's cross-validated scores.
    """
    x, y = np.asarray(x, np.float32), np.asarray(y, float)
    if len(y) < 2 * folds:
        raise PredictorError(f"need at least {2 * folds} measured subnets to select a model, got {len(y)}")
    families = list(families or FAMILIES)
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    results: dict[str, dict[str, float]] = {}
    on_all: dict[str, AccuracyPredictor] = {}
    oof: dict[str, np.ndarray] = {}
    for fam in families:  # the folds and the fit on all of them, fitted together
        *per_fold, on_all[fam] = fit_many(fam, [(x[fold != f], y[fold != f]) for f in range(folds)] + [(x, y)],
                                          space_digest, seed)
        oof[fam] = np.zeros_like(y)
        for f, fitted in enumerate(per_fold):
            oof[fam][fold == f] = fitted.predict_features(x[fold == f])
        results[fam] = _scores(oof[fam], y)
        log(f"  {fam:22s} cross-validated: tau {results[fam]['kendall_tau']:.3f}  rmse {results[fam]['rmse']:.3f}")
    best = max(families, key=lambda f: (results[f]["kendall_tau"], -results[f]["rmse"]))
    interval = conformal_interval(x, y, oof[best], fold, level)
    log(f"  {level:.0%} interval: +/-{interval.q:.2f} points near a measured subnet, "
        f"+/-{interval.q * 2:.2f} at {interval.kappa:g} choices from one")
    return replace(on_all[best], family=best, info={"cv": results, "selected": best}, interval=interval), results


def evaluate(pred: AccuracyPredictor, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Kendall τ, RMSE and MAE (points) of ``pred`` on measured (features, accuracy); with an interval, its
    coverage of the measurements and mean half-width (points). Measurements are of the validation split, so a
    predictor's shift to the test distribution is left out."""
    pred = replace(pred, shift=None)
    x, y = np.asarray(x, np.float32), np.asarray(y, float)
    b = pred.bounds_features(x)
    scores = _scores(b.prediction, y)
    if pred.interval is not None and len(y):
        scores["interval_coverage"] = round(float(np.mean((b.low <= y) & (y <= b.high))), 4)
        scores["interval_half_width"] = round(float(np.mean(b.high - b.low) / 2), 4)
        scores["extrapolated"] = int(b.extrapolated.sum())
    return scores

