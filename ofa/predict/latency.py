"""Per-device latency tables: profile every distinct block once, predict any arch by a sum.

A table is JSON (format ``ofa-latency-table``, version 1)::

    {"format": "ofa-latency-table", "version": 1, "target": "my-laptop",
     "space": {"name": ..., "digest": sha256 of the space JSON},
     "device": {"cpu": ..., "threads": 2, "batch": 1, "backend": "torch", "backend_version": ...},
     "entries": {"<block key>": milliseconds, ...},
     "correction": {"scale": 1.0, "offset_ms": 0.0},
     "reference": {"arch": {...}, "ms": 4.2},
     "references": [{"arch": {...}, "ms": 1.9}, ...],
     "calibration": {"archs": 24, "checked": 10, "rounds": 3, "kept": true,
                     "mean_abs_rel_error_raw": 0.13, "mean_abs_rel_error_corrected": 0.02}}

Every entry is a time > 0. ``device`` describes where the table was profiled; the
fields shown (and ``memory_format``: "nchw" | "channels_last", ``rounds``,
``min_run_time_s``) are optional, but typed when present: strings of at most 200
characters, ``threads`` 1..1024, ``batch`` 1..65536.
``reference`` (optional) is one subnet timed end to end while the table was profiled:
timing it again later measures how much faster or slower the device runs now, so
that drift of the device shows up as drift and not as an error of the table.
``references`` (optional) are more subnets timed end to end then (the corners of the
space): one subnet's re-timing is a noisy estimate of drift, their median ratio less so.
``calibration`` (optional, a record only) says how ``correction`` was fitted: on
``archs`` subnets timed end to end in ``rounds`` interleaved passes, the form chosen by
its error on ``checked`` of them that the first fit did not see, and whether it was
``kept`` (otherwise the correction is the identity).

Block keys name everything that decides a block's cost — kind, channels, kernel,
stride, activation, SE width and input size — so a table covers every resolution and
every stage of its space. The predictor turns the table into an array indexed like
the arch encoding and sums it for N archs in one gather (see :class:`CostModel`).
"""
from __future__ import annotations

import hashlib
import math
import platform
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..space import BlockSpec, SearchSpace
from .cost import gather_slots

__all__ = ["LatencyPredictor", "LatencyTableError", "check_target_name", "TABLE_FORMAT", "TABLE_VERSION", "block_plan",
           "space_digest", "validate_table"]

TABLE_FORMAT = "ofa-latency-table"
TABLE_VERSION = 1


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
                                f"(not starting with '.'); got {target!r}")
    return target


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 200


def _count(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


# The optional fields of ``device`` and ``calibration``: name -> (check, what is allowed).
# Other keys are kept as they are; these are read by the server and the reports.
_DEVICE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "cpu": (_text, "a string of at most 200 characters"),
    "backend": (_text, "a string of at most 200 characters"),
    "backend_version": (_text, "a string of at most 200 characters"),
    "threads": (_count(1, 1024), "an integer in 1..1024"),
    "batch": (_count(1, 65536), "an integer in 1..65536"),
    "memory_format": (lambda v: v in ("nchw", "channels_last"), "'nchw' or 'channels_last'"),
    "rounds": (_count(1, 10_000), "an integer in 1..10000"),
    "min_run_time_s": (lambda v: _number(v) is not None and v > 0, "a number > 0"),
}
_CALIBRATION_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "archs": (_count(0, 1_000_000), "an integer in 0..1000000"),
    "checked": (_count(0, 1_000_000), "an integer in 0..1000000"),
    "rounds": (_count(0, 10_000), "an integer in 0..10000"),
    "kept": (lambda v: isinstance(v, bool), "true or false"),
    "mean_abs_rel_error_raw": (lambda v: _number(v) is not None and v >= 0, "a number >= 0"),
    "mean_abs_rel_error_corrected": (lambda v: _number(v) is not None and v >= 0, "a number >= 0"),
}


def _check_fields(name: str, obj: Mapping[str, Any], fields: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    for key, (ok, allowed) in fields.items():
        if key in obj and not ok(obj[key]):
            raise LatencyTableError(f"{name}.{key} must be {allowed}, got {str(obj[key])[:40]!r}")


def validate_table(table: Any, space: SearchSpace | None = None) -> dict[str, Any]:
    """Check a table's structure (and, given a space, that it covers the space); return it."""
    if not isinstance(table, Mapping):
        raise LatencyTableError(f"a latency table must be a JSON object, got {type(table).__name__}")
    if table.get("format") != TABLE_FORMAT:
        raise LatencyTableError(f"format must be {TABLE_FORMAT!r}, got {table.get('format')!r}")
    if table.get("version") != TABLE_VERSION:
        raise LatencyTableError(f"version must be {TABLE_VERSION}, got {table.get('version')!r}")
    check_target_name(table.get("target"))
    for key in ("space", "device"):
        if not isinstance(table.get(key), Mapping):
            raise LatencyTableError(f"{key} must be an object")
    _check_fields("device", table["device"], _DEVICE_FIELDS)
    if table.get("calibration") is not None:
        if not isinstance(table["calibration"], Mapping):
            raise LatencyTableError("calibration must be an object (a record of how correction was fitted)")
        _check_fields("calibration", table["calibration"], _CALIBRATION_FIELDS)
    entries = table.get("entries")
    if not isinstance(entries, Mapping) or not entries:
        raise LatencyTableError("entries must be a non-empty object of block key -> milliseconds")
    if len(entries) > MAX_ENTRIES:
        raise LatencyTableError(f"entries has {len(entries)} keys; at most {MAX_ENTRIES} are accepted")
    for k, v in entries.items():
        if not isinstance(k, str) or len(k) > 200:
            raise LatencyTableError(f"entry keys must be strings of at most 200 characters, got {str(k)[:40]!r}")
        if _number(v) is None or v <= 0:
            raise LatencyTableError(f"entries[{k!r}] must be a finite number of milliseconds > 0, got {v!r}")
    corr = table.get("correction", {"scale": 1.0, "offset_ms": 0.0})
    if (not isinstance(corr, Mapping) or set(corr) != {"scale", "offset_ms"}
            or any(_number(corr[k]) is None for k in corr) or corr["scale"] <= 0):
        raise LatencyTableError("correction must be {\"scale\": number > 0, \"offset_ms\": number}")
    ref = table.get("reference")
    refs = table.get("references", [])
    if not isinstance(refs, list) or len(refs) > MAX_REFERENCES:
        raise LatencyTableError(f"references must be a list of at most {MAX_REFERENCES} "
                                "{\"arch\": an arch object, \"ms\": number > 0}")
    timed = ([("reference", ref)] if ref is not None else []) + [(f"references[{i}]", r) for i, r in enumerate(refs)]
    for name, r in timed:
        if not isinstance(r, Mapping) or set(r) != {"arch", "ms"} or _number(r["ms"]) is None or r["ms"] <= 0:
            raise LatencyTableError(f"{name} must be {{\"arch\": an arch object, \"ms\": number > 0}}")
    if space is not None:
        # The space first: a table of another space would otherwise fail on a detail of it.
        if table["space"].get("digest") != space_digest(space):
            raise LatencyTableError(
                f"the table was profiled for space {table['space'].get('name')!r} with a different "
                f"definition (digest mismatch); profile this artifact's space {space.name!r}")
        from ..space import Arch

        for name, r in timed:
            try:
                space.validate(Arch.from_dict(r["arch"]))
            except (ValueError, TypeError, KeyError) as e:
                raise LatencyTableError(f"{name}.arch: {e}") from None
        needed, _, _ = block_plan(space)
        missing = sorted(set(needed) - set(entries))
        if missing:
            raise LatencyTableError(f"entries lack {len(missing)} block keys of space {space.name!r}, "
                                    f"e.g. {missing[:2]}")
    return dict(table)


class LatencyPredictor:
    """Predicted latency (ms) of N encoded archs on one target: table sum, then correction."""

    def __init__(self, space: SearchSpace, table: Mapping[str, Any]) -> None:
        self.space = space
        self.table = validate_table(table, space)
        self.target = self.table["target"]
        entries, fixed, slots = block_plan(space)
        ms = self.table["entries"]
        n_res, n_k, n_e = len(space.resolutions), len(space.kernel_choices), len(space.expand_choices)
        self.slot_ms = np.zeros((n_res, space.num_slots, n_k, n_e))
        for (r, slot, ki, ei), key in slots.items():
            self.slot_ms[space.resolutions.index(r), slot, ki, ei] = ms[key]
        self.fixed_ms = np.array([sum(ms[k] for k in fixed[r]) for r in space.resolutions])
        corr = self.table.get("correction", {"scale": 1.0, "offset_ms": 0.0})
        self.scale, self.offset = float(corr["scale"]), float(corr["offset_ms"])

    @property
    def reference(self):
        """(Arch, ms) of the subnet timed end to end at profile time, or None for older tables."""
        from ..space import Arch

        ref = self.table.get("reference")
        return None if ref is None else (Arch.from_dict(ref["arch"]), float(ref["ms"]))

    @property
    def references(self) -> list:
        """[(Arch, ms)] of every subnet timed end to end at profile time: the reference first."""
        from ..space import Arch

        timed = ([self.table["reference"]] if self.table.get("reference") else []) + self.table.get("references", [])
        return [(Arch.from_dict(r["arch"]), float(r["ms"])) for r in timed]

    def raw(self, codes: np.ndarray) -> np.ndarray:
        """The uncorrected table sum (ms) of each encoded arch."""
        codes = np.asarray(codes)
        return self.fixed_ms[codes[:, -1]] + gather_slots(self.space, codes, self.slot_ms)

    def finish(self, raw: np.ndarray) -> np.ndarray:
        """The correction applied to table sums (monotone increasing, so it keeps their order)."""
        # a negative offset must not make a subnet look free: never below a tenth of the sum
        return np.maximum(raw * self.scale + self.offset, 0.1 * raw)

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        return self.finish(self.raw(codes))


def fit_correction(raw_ms: np.ndarray, measured_ms: np.ndarray) -> tuple[float, float]:
    """Least-squares ``measured ≈ scale · raw + offset`` in relative error (weights 1/measured)."""
    raw_ms, measured_ms = np.asarray(raw_ms, float), np.asarray(measured_ms, float)
    w = 1.0 / measured_ms
    a = np.stack([raw_ms * w, w], axis=1)
    (scale, offset), *_ = np.linalg.lstsq(a, measured_ms * w, rcond=None)
    if scale <= 0:
        return 1.0, 0.0
    return float(scale), float(offset)


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

