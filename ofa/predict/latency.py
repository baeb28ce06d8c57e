"""Per-device latency tables: every distinct block timed once, a model fitted end to end, any arch by a sum.

A table is JSON (format ``ofa-latency-table``, version 2), laid out in :mod:`ofa.predict._table`.

``entries`` are the blocks timed alone (every time > 0). They miss what a whole
network adds or saves — one call instead of one per block, caches, fusion — so the
prediction is the ``model`` over them, fitted by :mod:`ofa_client.latency_model` on
subnets timed end to end in the same interleaved passes, and chosen by its
cross-validated error: ``fixed_scale`` × (stem + first block + head) + Σ over active
blocks of (``stage_scale[stage]`` × entry + ``block_ms``) + ``offset_ms[resolution]``.
It stays a sum over blocks, so the search scores N archs in one gather and finds exact
lower bounds. ``fit.quality.held_out`` is measured on subnets the fit never saw.

``references`` are subnets timed end to end when the table was profiled. Timed again
later on the device (``ofa profile --recalibrate``, or by a pipeline that sends the
timings with a search request) their median ratio is how much faster or slower the
device runs now: ``recalibration`` (optional) maps every prediction by ``scale`` (and
``offset_ms``), see :class:`Speed`.
Version 1 tables (blocks timed inside the training process, a correction fitted on a
few subnets) are refused: profile again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from ofa_client.latency_model import MIN_PREDICTED_MS
from ofa_client.timing import describe_cpu
from ofa_client.values import SPEED_TOLERANCE  # passes further apart: the speed is unsettled (a third pass decides)

from ..space import Arch, BlockSpec, SearchSpace, space_digest
from ._table import (SPEED_RANGE, TABLE_FORMAT, TABLE_KEYS, TABLE_VERSION, LatencyTableError, check_model,
                     check_structure, check_target_name)
from .cost import gather_slots

__all__ = ["LatencyPredictor", "LatencyTableError", "SPEED_RANGE", "SPEED_TOLERANCE", "Speed", "check_target_name",
           "table_format", "table_noise", "TABLE_FORMAT", "TABLE_KEYS", "TABLE_VERSION", "block_plan", "describe_cpu",
           "validate_table"]



def _block_key(b: BlockSpec, h: int) -> str:
    return (f"mb:i{b.in_ch}:m{b.mid_ch}:o{b.out_ch}:k{b.kernel}:s{b.stride}:{b.act}:se{b.se_ch}"
            f":x{int(b.expand_conv)}:h{h}")


@dataclass(frozen=True)
class PlanEntry:
    """One distinct thing to time: its key, what builds it, and its input shape (C, H, W)."""

    key: str
    kind: str  # "stem", "block", "head"
    block: BlockSpec | None
    in_shape: tuple[int, int, int]


def block_plan(space: SearchSpace) -> tuple[dict[str, PlanEntry], dict[int, tuple[str, ...]], dict[tuple, str]]:
    """Everything to profile for ``space``.

    Returns (entries by key, the fixed keys (stem, first block, head) by resolution,
    slot keys by (resolution, slot, kernel index, expand index)).
    """
    entries: dict[str, PlanEntry] = {}
    fixed: dict[int, tuple[str, ...]] = {}
    slots: dict[tuple, str] = {}

    def add(key: str, kind: str, block: BlockSpec | None, shape: tuple[int, int, int]) -> str:
        entries.setdefault(key, PlanEntry(key, kind, block, shape))
        return key

    for r in space.resolutions:
        h = space.stem_size(r)
        stem = add(f"stem:i{space.in_channels}:o{space.stem_width}:s{space.stem_stride}:h{r}", "stem", None,
                   (space.in_channels, r, r))
        fb = space.first_block()
        first = add(_block_key(fb, h), "block", fb, (fb.in_ch, h, h))
        for slot, ki, ei, b in space.slot_blocks(r):
            h = slot.in_size
            slots[(r, slot.index, ki, ei)] = add(_block_key(b, h), "block", b, (b.in_ch, h, h))
        h, last = space.head_size(r), space.stages[-1].width
        head = add(f"head:i{last}:f{space.final_expand_width}:w{space.head_width}:c{space.num_classes}:h{h}",
                   "head", None, (last, h, h))
        fixed[r] = (stem, first, head)
    return entries, fixed, slots


def validate_table(table: Any, space: SearchSpace | None = None) -> dict[str, Any]:
    """Check a table's structure (and, given a space, that it covers the space); return it."""
    check_structure(table)
    if space is not None:
        _check_fits(table, space)
    return dict(table)


def _check_fits(table: Mapping[str, Any], space: SearchSpace) -> None:
    # The space first: a table of another space would otherwise fail on a detail of it.
    if table["space"].get("digest") != space_digest(space):
        raise LatencyTableError(
            f"the table was profiled for space {str(table['space'].get('name'))[:80]!r} with a different "
            f"definition (digest mismatch); profile this artifact's space {space.name!r}")
    check_model(table["model"], space)
    for i, r in enumerate(table.get("references", [])):
        try:
            space.validate(Arch.from_dict(r["arch"]))
        except (ValueError, TypeError, KeyError) as e:
            raise LatencyTableError(f"references[{i}].arch: {e}") from None
    needed, _, _ = block_plan(space)
    missing = sorted(set(needed) - set(table["entries"]))
    if missing:
        raise LatencyTableError(f"entries lack {len(missing)} block keys of space {space.name!r}, "
                                f"e.g. {missing[:2]}")


@dataclass(frozen=True)
class Speed:
    """How the device runs now against when its table was profiled: ``now = scale · then + offset_ms``.

    Fitted on the table's reference subnets timed again (:meth:`fit`). A shared machine does not
    only get uniformly slower or faster: measured here, the smallest references ran ×0.69 and the
    largest ×0.92 of their profiled time in one minute, a per-call cost that changed more than
    the compute; so the fit may add an offset to the scale, when that predicts the references
    better (leave-one-out).
    """

    scale: float = 1.0
    offset_ms: float = 0.0
    # its uncertainty, when the references were timed in several passes (:meth:`fit_passes`): how far
    # the passes' levels lay apart, relative to the speed, and how many there were (0: not measured)
    spread: float = 0.0
    passes: int = 0

    def apply(self, ms: np.ndarray) -> np.ndarray:
        return np.maximum(np.asarray(ms) * self.scale + self.offset_ms, MIN_PREDICTED_MS)

    def to_dict(self) -> dict[str, float]:
        out = {"scale": round(self.scale, 6), "offset_ms": round(self.offset_ms, 6)}
        return {**out, "spread": round(self.spread, 5), "passes": self.passes} if self.passes else out

    @property
    def unsettled(self) -> bool:
        """The passes disagreed on the level by more than :data:`SPEED_TOLERANCE`."""
        return self.spread > SPEED_TOLERANCE

    def describe(self) -> str:
        out = f"x{self.scale:.3f}" + (f" {self.offset_ms:+.3f} ms" if self.offset_ms else "")
        if self.passes > 1:
            out += f" ({self.passes} passes {self.spread:.1%} apart{': unsettled' if self.unsettled else ''})"
        return out

    def check_range(self, profiled_ms: Sequence[float]) -> None:
        """Refuse (ValueError) a speed whose scale, or that takes any of ``profiled_ms``, lies beyond
        :data:`SPEED_RANGE` of itself: the timings it was fitted on were not taken on the table's device and runtime."""
        then = np.asarray(profiled_ms, float)
        ratios, (lo, hi) = self.apply(then) / then, SPEED_RANGE
        if not (lo <= ratios.min() and ratios.max() <= hi and lo <= self.scale <= hi):
            raise ValueError(f"imply the device runs at {self.describe()} of its profiled time; only x{lo:g} to "
                             f"x{hi:g} is accepted (were they timed on this target's device and runtime?)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Speed":
        d = d or {}
        return cls(float(d.get("scale", 1.0)), float(d.get("offset_ms", 0.0)), float(d.get("spread", 0.0)),
                   int(d.get("passes", 0)))

    @staticmethod
    def _fit(p: np.ndarray, n: np.ndarray, affine: bool) -> "Speed":
        if not affine:
            return Speed(float(np.median(n / p)))
        # least squares in relative error: (scale · p + offset) / n ≈ 1
        a = np.stack([p / n, 1 / n], axis=1)
        scale, offset = np.linalg.lstsq(a, np.ones(len(n)), rcond=None)[0]
        return Speed(float(scale), float(offset))

    @classmethod
    def fit(cls, profiled_ms, now_ms) -> "Speed":
        """The speed that maps the references' profiled times to their times now: the median ratio, or a
        scale and offset when those predict each reference better from the others (and stay monotone)."""
        p, n = np.asarray(profiled_ms, float), np.asarray(now_ms, float)
        if len(p) == 0 or len(p) != len(n) or not (np.all(p > 0) and np.all(n > 0)):
            raise ValueError("fitting a speed needs one time now > 0 for each profiled time > 0")
        plain = cls._fit(p, n, False)
        if len(p) < 4 or np.ptp(p) < 0.2 * p.mean():  # too few, or too alike, to tell a scale from an offset
            return plain
        loo = {False: [], True: []}
        for i in range(len(p)):
            keep = np.arange(len(p)) != i
            for affine in (False, True):
                s = cls._fit(p[keep], n[keep], affine)
                loo[affine].append(abs(s.apply(p[i]) / n[i] - 1))
        both = cls._fit(p, n, True)
        if np.mean(loo[True]) < np.mean(loo[False]) and both.scale > 0 and np.all(both.apply(p) > 0.1 * n):
            return both
        return plain

    @classmethod
    def fit_passes(cls, profiled_ms, now_ms, pass_index) -> "Speed":
        """:meth:`fit` on the references' timings of every pass together (``pass_index`` says each timing's
        pass), with the passes' disagreement as its ``spread``: (highest - lowest pass level) / the level
        of all, each level the median ratio of time now to time profiled. One pass's level moved by up
        to 9% between passes minutes apart here (docs/demo.md): the spread is what the speed may be off."""
        p, n, k = np.asarray(profiled_ms, float), np.asarray(now_ms, float), np.asarray(pass_index)
        speed = cls.fit(p, n)
        ratio = n / p
        levels = [float(np.median(ratio[k == j])) for j in np.unique(k)]
        spread = (max(levels) - min(levels)) / float(np.median(ratio))
        return dataclasses.replace(speed, spread=spread, passes=len(levels))


class LatencyPredictor:
    """Predicted latency (ms) of N encoded archs on one target: the table's model summed over blocks,
    at the device's speed now (``speed``; the table's recalibration by default)."""

    def __init__(self, space: SearchSpace, table: Mapping[str, Any], speed: Speed | None = None) -> None:
        self.space = space
        self.table = validate_table(table, space)
        self.target = self.table["target"]
        _, fixed, slots = block_plan(space)
        ms = self.table["entries"]
        n_res, n_k, n_e = len(space.resolutions), len(space.kernel_choices), len(space.expand_choices)
        entry_ms = np.zeros((n_res, space.num_slots, n_k, n_e))
        for (r, slot, ki, ei), key in slots.items():
            entry_ms[space.resolutions.index(r), slot, ki, ei] = ms[key]
        self.entry_ms = entry_ms  # the blocks as timed alone
        self.entry_fixed_ms = np.array([sum(ms[k] for k in fixed[r]) for r in space.resolutions])
        model = self.table["model"]
        stage_of_slot = np.repeat(np.arange(space.num_stages), space.max_depth)
        scale = np.asarray(model["stage_scale"], float)[stage_of_slot]
        # the model folded into the arrays the search gathers from: still one sum over blocks
        self.slot_ms = entry_ms * scale[None, :, None, None] + float(model["block_ms"])
        self.fixed_ms = (self.entry_fixed_ms * float(model["fixed_scale"])
                         + np.array([float(model["offset_ms"][str(r)]) for r in space.resolutions]))
        self.speed = Speed.from_dict(self.table.get("recalibration")) if speed is None else speed

    def with_speed(self, speed: Speed) -> "LatencyPredictor":
        """The same table for a device running at ``speed`` (``Speed()``: as when it was profiled)."""
        other = object.__new__(LatencyPredictor)
        other.__dict__.update(self.__dict__)
        other.speed = speed
        return other

    @property
    def references(self) -> list[tuple[Arch, float]]:
        """[(Arch, ms)] of the subnets timed end to end when the table was profiled."""
        return [(Arch.from_dict(r["arch"]), float(r["ms"])) for r in self.table.get("references", [])]

    def features(self, codes: np.ndarray) -> np.ndarray:
        """What the model is fitted on, per arch: the fixed parts' and each stage's summed entries, the number
        of active blocks, and one column per resolution (see :mod:`ofa_client.latency_model`)."""
        codes = np.asarray(codes)
        sp = self.space
        stage_sums = []
        for s in range(sp.num_stages):
            only = np.zeros_like(self.entry_ms)
            only[:, s * sp.max_depth:(s + 1) * sp.max_depth] = self.entry_ms[:, s * sp.max_depth:(s + 1) * sp.max_depth]
            stage_sums.append(gather_slots(sp, codes, only))
        blocks = sp.active_mask(codes).sum(axis=1)
        onehot = np.eye(len(sp.resolutions))[codes[:, -1]]
        return np.column_stack([self.entry_fixed_ms[codes[:, -1]], *stage_sums, blocks, onehot])

    def raw(self, codes: np.ndarray) -> np.ndarray:
        """The model's prediction (ms) at the speed of profiling time."""
        codes = np.asarray(codes)
        return self.fixed_ms[codes[:, -1]] + gather_slots(self.space, codes, self.slot_ms)

    def finish(self, raw: np.ndarray) -> np.ndarray:
        """Model sums to predictions at the device's speed, never below a microsecond (monotone: keeps the order)."""
        return self.speed.apply(np.maximum(raw, MIN_PREDICTED_MS))

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        return self.finish(self.raw(codes))


def table_noise(table: Mapping[str, Any]) -> str:
    """Why a table's timings are not to be trusted ("" when its profile's repeatability check passed): the
    protocol's own verdict, carried into every answer that uses the table."""
    rep = (table.get("timing") or {}).get("repeatability") or {}
    if rep.get("trusted", True):
        return ""
    return str(rep.get("verdict") or "the profile's repeatability check failed")


def table_format(table: Mapping[str, Any]) -> str | None:
    """The served format (:data:`ofa.export.FORMATS`) a table's device runs and was timed in: the one it records
    (``device.weights_format``; None for one unknown here), else the one of its backend and precision. A
    table that records none predates API 1.5, when every int8 network was onnxruntime's quantizer's (also
    where a device timed them in OpenVINO)."""
    from ..export import FORMATS, run_format  # torch: imported when asked, not with the tables

    device = table.get("device") or {}
    recorded, precision = device.get("weights_format"), str(device.get("precision", "fp32"))
    if recorded is not None:
        return recorded if recorded in FORMATS else None
    try:
        return run_format("onnxruntime" if precision != "fp32" else str(device.get("backend", "")), precision)
    except ValueError:
        return None


def iter_plan(space: SearchSpace, seed: int = 0) -> Iterator[PlanEntry]:
    """The plan's entries in a seeded random order (interleaves kinds and sizes while timing)."""
    entries, _, _ = block_plan(space)
    order = np.random.default_rng(seed).permutation(len(entries))
    values = list(entries.values())
    for i in order:
        yield values[i]

