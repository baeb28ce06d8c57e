"""Per-device latency tables: every distinct block timed once, a model fitted end to end, any arch by a sum.

A table is JSON (format ``ofa-latency-table``, version 2)::

    {"format": "ofa-latency-table", "version": 2, "target": "my-laptop",
     "space": {"name": ..., "digest": sha256 of the space JSON},
     "device": {"cpu": ..., "threads": 2, "batch": 1, "backend": "onnxruntime", "backend_version": ...,
                "memory_format": "nchw"},
     "timing": {"rounds": 6, "samples": 2, "sample_ms": 10, "warmup_ms": 20,
                "statistic": "median over passes of the fastest sample, at the median machine speed",
                "repeatability": {"median_abs_rel_diff": 0.01, "spearman": 0.99, "trusted": true, ...}},
     "entries": {"<block key>": milliseconds, ...},
     "model": {"family": "stages+blocks", "fixed_scale": 1.0, "stage_scale": [1.0, ...],
               "block_ms": -0.01, "offset_ms": {"24": 0.05, "28": 0.06}},
     "fit": {"subnets": 60, "held_out": 20, "cv": {"sum": 0.4, ...},
             "quality": {"held_out": {"within_10pct": 1.0, "spearman": 0.98, "mean_abs_rel_error": 0.03,
                                      "worst_abs_rel_error": 0.08}, "fit": {...}}},
     "references": [{"arch": {...}, "ms": 1.9}, ...],
     "recalibration": {"scale": 1.07, "offset_ms": 0.0, "ratios": [...], "measured_at": "2026-12-01T20:00:00Z"}}

``entries`` are the blocks timed alone (every time > 0). They miss what a whole
network adds or saves — one call instead of one per block, caches, fusion — so the
prediction is the ``model`` over them, fitted by :mod:`ofa.predict.latency_model` on
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

import hashlib
import math
import platform
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..space import Arch, BlockSpec, SearchSpace
from .cost import gather_slots

__all__ = ["LatencyPredictor", "LatencyTableError", "Speed", "check_target_name", "TABLE_FORMAT", "TABLE_KEYS",
           "TABLE_VERSION", "block_plan",
           "space_digest", "validate_table"]

TABLE_FORMAT = "ofa-latency-table"
TABLE_VERSION = 2
# the top-level keys of a table; others are dropped where a table is stored on a client's behalf
TABLE_KEYS = ("format", "version", "target", "space", "device", "timing", "entries", "model", "fit", "references",
              "recalibration", "profile_seconds")
MIN_PREDICTED_MS = 1e-3  # a fitted model never predicts a subnet as free


class LatencyTableError(ValueError):
    """A latency table that is malformed or does not fit the space; the message says why."""


def space_digest(space: SearchSpace) -> str:
    return hashlib.sha256(space.to_json().encode()).hexdigest()


def _out(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


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
        h = _out(r, space.stem_stride)
        stem = add(f"stem:i{space.in_channels}:o{space.stem_width}:s{space.stem_stride}:h{r}", "stem", None,
                   (space.in_channels, r, r))
        fb = space.first_block()
        first = add(_block_key(fb, h), "block", fb, (fb.in_ch, h, h))
        for s, (stage, stage_in) in enumerate(zip(space.stages, space.stage_in_channels())):
            for j in range(space.max_depth):
                in_ch = stage_in if j == 0 else stage.width
                stride = stage.stride if j == 0 else 1
                for ki, k in enumerate(space.kernel_choices):
                    for ei, e in enumerate(space.expand_choices):
                        mid = space.mid_channels(in_ch, e)
                        b = BlockSpec(in_ch, mid, stage.width, k, stride, stage.act, stage.se,
                                      space.se_channels(mid) if stage.se else 0, True)
                        slots[(r, s * space.max_depth + j, ki, ei)] = add(_block_key(b, h), "block", b, (in_ch, h, h))
                if j == 0:
                    h = _out(h, stage.stride)
        last = space.stages[-1].width
        head = add(f"head:i{last}:f{space.final_expand_width}:w{space.head_width}:c{space.num_classes}:h{h}",
                   "head", None, (last, h, h))
        fixed[r] = (stem, first, head)
    return entries, fixed, slots


MAX_ENTRIES = 100_000
MAX_REFERENCES = 64


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN, ±inf, huge integers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def check_target_name(target: Any) -> str:
    """A target name is also a file name: 1-64 of letters, digits, '-', '_', '.' (not leading '.')."""
    if (not isinstance(target, str) or not 0 < len(target) <= 64 or target.startswith(".")
            or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in target)):
        raise LatencyTableError("target must be 1-64 characters of letters, digits, '-', '_' or '.' "
                                f"(not starting with '.'); got {str(target)[:80]!r}")
    return target


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 200


def _count(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _real(low: float = -math.inf, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: _number(v) is not None and low <= v <= high


_SHARE = (_real(0, 1), "a number in [0, 1]")
_NONNEG = (_real(0), "a number >= 0")
# The typed fields of the table's objects: name -> (check, what is allowed). Other keys
# are kept as they are; these are read by the server, the reports and `ofa info`.
_DEVICE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "cpu": (_text, "a string of at most 200 characters"),
    "backend": (_text, "a string of at most 200 characters"),
    "backend_version": (_text, "a string of at most 200 characters"),
    "threads": (_count(1, 1024), "an integer in 1..1024"),
    "batch": (_count(1, 65536), "an integer in 1..65536"),
    "memory_format": (lambda v: v in ("nchw", "channels_last"), "'nchw' or 'channels_last'"),
}
_TIMING_FIELDS = {
    "rounds": (_count(2, 10_000), "an integer in 2..10000"),
    "samples": (_count(1, 10_000), "an integer in 1..10000"),
    "sample_ms": (_real(1e-6), "a number > 0"),
    "warmup_ms": (_real(1e-6), "a number > 0"),
    "statistic": (_text, "a string of at most 200 characters"),
    "repeatability": (lambda v: isinstance(v, Mapping), "an object"),
}
_QUALITY_FIELDS = {
    "subnets": (_count(0, 1_000_000), "an integer in 0..1000000"),
    "within_10pct": _SHARE,
    "spearman": (_real(-1, 1), "a number in [-1, 1]"),
    "mean_abs_rel_error": _NONNEG,
    "worst_abs_rel_error": _NONNEG,
}
_FIT_FIELDS = {
    "subnets": (_count(0, 1_000_000), "an integer in 0..1000000"),
    "held_out": (_count(0, 1_000_000), "an integer in 0..1000000"),
    "cv": (lambda v: isinstance(v, Mapping) and len(v) <= 32 and all(_real(0)(x) for x in v.values()),
           "an object of at most 32 family -> number >= 0"),
    "quality": (lambda v: isinstance(v, Mapping), "an object"),
}
_RECALIBRATION_FIELDS = {
    "scale": (_real(0.01, 100), "a number in [0.01, 100]"),
    "offset_ms": (_real(-1e6, 1e6), "a number in [-1e6, 1e6]"),
    "ratios": (lambda v: isinstance(v, list) and len(v) <= MAX_REFERENCES and all(_real(1e-6)(x) for x in v),
               f"a list of at most {MAX_REFERENCES} numbers > 0"),
    "measured_at": (_text, "a string of at most 200 characters"),
}


def _check_fields(name: str, obj: Any, fields: Mapping[str, tuple[Callable[[Any], bool], str]],
                  required: tuple[str, ...] = ()) -> None:
    if not isinstance(obj, Mapping):
        raise LatencyTableError(f"{name} must be an object")
    for key in required:
        if key not in obj:
            raise LatencyTableError(f"{name}.{key} is required")
    for key, (ok, allowed) in fields.items():
        if key in obj and not ok(obj[key]):
            raise LatencyTableError(f"{name}.{key} must be {allowed}, got {str(obj[key])[:40]!r}")


def _check_model(model: Any, space: SearchSpace | None) -> None:
    _check_fields("model", model, {
        "family": (_text, "a string of at most 200 characters"),
        "fixed_scale": (_real(1e-6, 1e6), "a number in (0, 1e6]"),
        "stage_scale": (lambda v: isinstance(v, list) and 0 < len(v) <= 64 and all(_real(1e-6, 1e6)(x) for x in v),
                        "a list of 1..64 numbers in (0, 1e6]"),
        "block_ms": (_real(-1e6, 1e6), "a number in [-1e6, 1e6]"),
        "offset_ms": (lambda v: isinstance(v, Mapping) and 0 < len(v) <= 1024
                      and all(isinstance(k, str) and k.isdigit() and len(k) < 6 and _real(-1e6, 1e6)(x)
                              for k, x in v.items()),
                      "an object of 1..1024 resolution -> number in [-1e6, 1e6]"),
    }, required=("family", "fixed_scale", "stage_scale", "block_ms", "offset_ms"))
    if space is not None:
        if len(model["stage_scale"]) != space.num_stages:
            raise LatencyTableError(f"model.stage_scale has {len(model['stage_scale'])} values; space "
                                    f"{space.name!r} has {space.num_stages} stages")
        if sorted(int(k) for k in model["offset_ms"]) != list(space.resolutions):
            raise LatencyTableError(f"model.offset_ms must have one value for each resolution of the space, "
                                    f"{list(space.resolutions)}")


def validate_table(table: Any, space: SearchSpace | None = None) -> dict[str, Any]:
    """Check a table's structure (and, given a space, that it covers the space); return it."""
    if not isinstance(table, Mapping):
        raise LatencyTableError(f"a latency table must be a JSON object, got {type(table).__name__}")
    if table.get("format") != TABLE_FORMAT:
        raise LatencyTableError(f"format must be {TABLE_FORMAT!r}, got {str(table.get('format'))[:40]!r}")
    if table.get("version") == 1:
        raise LatencyTableError("this is a version 1 latency table (blocks timed in the training process, without "
                                "an end-to-end model); version 2 is required: profile the device again with "
                                "`ofa profile`")
    if table.get("version") != TABLE_VERSION:
        raise LatencyTableError(f"version must be {TABLE_VERSION}, got {str(table.get('version'))[:40]!r}")
    check_target_name(table.get("target"))
    if not isinstance(table.get("space"), Mapping):
        raise LatencyTableError("space must be an object")
    _check_fields("device", table.get("device"), _DEVICE_FIELDS)
    for key, fields in (("timing", _TIMING_FIELDS), ("fit", _FIT_FIELDS), ("recalibration", _RECALIBRATION_FIELDS)):
        if table.get(key) is not None:
            _check_fields(key, table[key], fields, required=("scale",) if key == "recalibration" else ())
    for part, quality in ((table.get("fit") or {}).get("quality") or {}).items():
        _check_fields(f"fit.quality.{str(part)[:20]}", quality, _QUALITY_FIELDS)
    entries = table.get("entries")
    if not isinstance(entries, Mapping) or not entries:
        raise LatencyTableError("entries must be a non-empty object of block key -> milliseconds")
    if len(entries) > MAX_ENTRIES:
        raise LatencyTableError(f"entries has {len(entries)} keys; at most {MAX_ENTRIES} are accepted")
    for k, v in entries.items():
        if not isinstance(k, str) or len(k) > 200:
            raise LatencyTableError(f"entry keys must be strings of at most 200 characters, got {str(k)[:40]!r}")
        if _number(v) is None or v <= 0:
            raise LatencyTableError(f"entries[{k!r}] must be a finite number of milliseconds > 0, got {str(v)[:40]!r}")
    _check_model(table.get("model"), None)
    refs = table.get("references", [])
    if not isinstance(refs, list) or len(refs) > MAX_REFERENCES:
        raise LatencyTableError(f"references must be a list of at most {MAX_REFERENCES} "
                                "{\"arch\": an arch object, \"ms\": number > 0}")
    for i, r in enumerate(refs):
        if not isinstance(r, Mapping) or set(r) != {"arch", "ms"} or _number(r["ms"]) is None or r["ms"] <= 0:
            raise LatencyTableError(f"references[{i}] must be {{\"arch\": an arch object, \"ms\": number > 0}}")
    if space is not None:
        # The space first: a table of another space would otherwise fail on a detail of it.
        if table["space"].get("digest") != space_digest(space):
            raise LatencyTableError(
                f"the table was profiled for space {str(table['space'].get('name'))[:80]!r} with a different "
                f"definition (digest mismatch); profile this artifact's space {space.name!r}")
        _check_model(table["model"], space)
        for i, r in enumerate(refs):
            try:
                space.validate(Arch.from_dict(r["arch"]))
            except (ValueError, TypeError, KeyError) as e:
                raise LatencyTableError(f"references[{i}].arch: {e}") from None
        needed, _, _ = block_plan(space)
        missing = sorted(set(needed) - set(entries))
        if missing:
            raise LatencyTableError(f"entries lack {len(missing)} block keys of space {space.name!r}, "
                                    f"e.g. {missing[:2]}")
    return dict(table)


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

    def apply(self, ms: np.ndarray) -> np.ndarray:
        return np.maximum(np.asarray(ms) * self.scale + self.offset_ms, MIN_PREDICTED_MS)

    def to_dict(self) -> dict[str, float]:
        return {"scale": round(self.scale, 6), "offset_ms": round(self.offset_ms, 6)}

    def describe(self) -> str:
        return f"x{self.scale:.3f}" + (f" {self.offset_ms:+.3f} ms" if self.offset_ms else "")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Speed":
        d = d or {}
        return cls(float(d.get("scale", 1.0)), float(d.get("offset_ms", 0.0)))

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
        of active blocks, and one column per resolution (see :mod:`ofa.predict.latency_model`)."""
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


def describe_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def iter_plan(space: SearchSpace, seed: int = 0) -> Iterator[PlanEntry]:
    """The plan's entries in a seeded random order (interleaves kinds and sizes while timing)."""
    entries, _, _ = block_plan(space)
    order = np.random.default_rng(seed).permutation(len(entries))
    values = list(entries.values())
    for i in order:
        yield values[i]

