"""The latency table's file format: its constants and the checks of its structure.

A table is JSON (format ``ofa-latency-table``, version 2)::

    {"format": "ofa-latency-table", "version": 2, "target": "my-laptop",
     "space": {"name": ..., "digest": sha256 of the space JSON},
     "device": {"cpu": ..., "threads": 2, "batch": 1, "backend": "onnxruntime", "backend_version": ...,
                "memory_format": "nchw", "precision": "fp32",
                "weights_format": the served format timed (ofa.export.FORMATS; absent before API 1.5)},
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
     "recalibration": {"scale": 1.07, "offset_ms": 0.0, "ratios": [...], "measured_at": "2026-12-01T20:00:00Z",
                       "spread": 0.021, "passes": 2}}

Private: :mod:`ofa.predict.latency` re-exports the public names, checks that a table
fits a space (digest, model, references, block keys) and predicts from it. Nothing here
needs a space's geometry: the JSON alone, and for the model a space's stages and resolutions.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from ofa_client.values import check_target_name as _target_name

from ..space import SearchSpace

__all__ = ["LatencyTableError", "TABLE_FORMAT", "TABLE_KEYS", "TABLE_VERSION", "check_model", "check_structure",
           "check_target_name"]

TABLE_FORMAT = "ofa-latency-table"
TABLE_VERSION = 2
# the top-level keys of a table; others are dropped where a table is stored on a client's behalf
TABLE_KEYS = ("format", "version", "target", "space", "device", "timing", "entries", "model", "fit", "references",
              "recalibration", "profile_seconds")
MAX_ENTRIES = 100_000
MAX_REFERENCES = 64
MAX_MS = 1e6  # a block's or a network's time (ms): beyond it, sums and fits of them overflow or mean nothing
# how deep objects and lists may nest in a table: the format needs 4; a client's table nested ~1000 deep was
# accepted by json.loads and then broke every pickle of it (a search worker's, a scan's)
MAX_DEPTH = 16
# how much slower or faster than profiled a device may run (a recalibration's scale; the speed a search's reference
# timings imply): beyond it, the timings were not taken on the table's device and runtime
SPEED_RANGE = (0.01, 100.0)


class LatencyTableError(ValueError):
    """A latency table that is malformed or does not fit the space; the message says why."""


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
    """A target name is also a file name (:func:`ofa_client.values.check_target_name`): a LatencyTableError here."""
    try:
        return _target_name(target)
    except ValueError as e:
        raise LatencyTableError(str(e)) from None


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 200


def _count(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _real(low: float = -math.inf, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: _number(v) is not None and low <= v <= high


def _resolution_key(k: Any) -> bool:
    """A resolution as a key of ``model.offset_ms``: ASCII digits as ``str(int)`` writes them ('28', not '028')."""
    return isinstance(k, str) and 0 < len(k) < 6 and k.isascii() and k.isdigit() and k == str(int(k))


def _check_depth(value: Any) -> None:
    """Refuse objects and lists nested deeper than :data:`MAX_DEPTH` (without recursion: the value may be deep)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (Mapping, list)):
            if depth > MAX_DEPTH:
                raise LatencyTableError(f"a latency table nests objects and lists at most {MAX_DEPTH} deep")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, Mapping) else v))


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
    "precision": (lambda v: v in ("fp32", "int8"), "'fp32' or 'int8'"),
    "provider": (_text, "a string of at most 200 characters"),
    "weights_format": (_text, "a string of at most 200 characters"),
}
_TIMING_FIELDS = {
    "rounds": (_count(2, 10_000), "an integer in 2..10000"),
    "samples": (_count(1, 10_000), "an integer in 1..10000"),
    "sample_ms": (_real(1e-6), "a number > 0"),
    "warmup_ms": (_real(1e-6), "a number > 0"),
    "statistic": (_text, "a string of at most 200 characters"),
    "repeatability": (lambda v: isinstance(v, Mapping), "an object"),
}
# the protocol's own check (ofa_client.timing.Timings.repeatability): its verdict is said in every answer
_REPEATABILITY_FIELDS = {
    "trusted": (lambda v: isinstance(v, bool), "true or false"),
    "verdict": (lambda v: isinstance(v, str) and len(v) <= 1000, "a string of at most 1000 characters"),
    "networks": (_count(0, 1_000_000), "an integer in 0..1000000"),
    "round_speeds": (lambda v: isinstance(v, list) and len(v) <= 10_000 and all(_real()(x) for x in v),
                     "a list of at most 10000 numbers"),
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
    "scale": (_real(*SPEED_RANGE), f"a number in [{SPEED_RANGE[0]:g}, {SPEED_RANGE[1]:g}]"),
    "offset_ms": (_real(-1e6, 1e6), "a number in [-1e6, 1e6]"),
    "ratios": (lambda v: isinstance(v, list) and len(v) <= MAX_REFERENCES and all(_real(1e-6)(x) for x in v),
               f"a list of at most {MAX_REFERENCES} numbers > 0"),
    "measured_at": (_text, "a string of at most 200 characters"),
    "spread": (_real(0, 100), "a number in [0, 100]"),
    "passes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 16, "an integer in [0, 16]"),
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


def check_model(model: Any, space: SearchSpace | None) -> None:
    """Check a table's ``model`` object (and, given a space, that it has one value per stage and resolution)."""
    _check_fields("model", model, {
        "family": (_text, "a string of at most 200 characters"),
        "fixed_scale": (_real(1e-6, 1e6), "a number in (0, 1e6]"),
        "stage_scale": (lambda v: isinstance(v, list) and 0 < len(v) <= 64 and all(_real(1e-6, 1e6)(x) for x in v),
                        "a list of 1..64 numbers in (0, 1e6]"),
        "block_ms": (_real(-1e6, 1e6), "a number in [-1e6, 1e6]"),
        "offset_ms": (lambda v: isinstance(v, Mapping) and 0 < len(v) <= 1024
                      and all(_resolution_key(k) and _real(-1e6, 1e6)(x) for k, x in v.items()),
                      "an object of 1..1024 resolution (as '28', not '028') -> number in [-1e6, 1e6]"),
    }, required=("family", "fixed_scale", "stage_scale", "block_ms", "offset_ms"))
    if space is not None:
        if len(model["stage_scale"]) != space.num_stages:
            raise LatencyTableError(f"model.stage_scale has {len(model['stage_scale'])} values; space "
                                    f"{space.name!r} has {space.num_stages} stages")
        if sorted(int(k) for k in model["offset_ms"]) != list(space.resolutions):
            raise LatencyTableError(f"model.offset_ms must have one value for each resolution of the space, "
                                    f"{list(space.resolutions)}")


def check_structure(table: Any) -> None:
    """Raise :class:`LatencyTableError` unless ``table`` has the format's keys, types and ranges."""
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
    _check_depth(table)
    if not isinstance(table.get("space"), Mapping):
        raise LatencyTableError("space must be an object")
    _check_fields("device", table.get("device"), _DEVICE_FIELDS)
    for key, fields in (("timing", _TIMING_FIELDS), ("fit", _FIT_FIELDS), ("recalibration", _RECALIBRATION_FIELDS)):
        if table.get(key) is not None:
            _check_fields(key, table[key], fields, required=("scale",) if key == "recalibration" else ())
    for part, quality in ((table.get("fit") or {}).get("quality") or {}).items():
        _check_fields(f"fit.quality.{str(part)[:20]}", quality, _QUALITY_FIELDS)
    if (table.get("timing") or {}).get("repeatability") is not None:
        _check_fields("timing.repeatability", table["timing"]["repeatability"], _REPEATABILITY_FIELDS)
    entries = table.get("entries")
    if not isinstance(entries, Mapping) or not entries:
        raise LatencyTableError("entries must be a non-empty object of block key -> milliseconds")
    if len(entries) > MAX_ENTRIES:
        raise LatencyTableError(f"entries has {len(entries)} keys; at most {MAX_ENTRIES} are accepted")
    for k, v in entries.items():
        if not isinstance(k, str) or len(k) > 200:
            raise LatencyTableError(f"entry keys must be strings of at most 200 characters, got {str(k)[:40]!r}")
        if _number(v) is None or not 0 < v <= MAX_MS:
            raise LatencyTableError(f"entries[{str(k)[:40]!r}] must be a number of milliseconds in (0, {MAX_MS:g}], "
                                    f"got {str(v)[:40]!r}")
    check_model(table.get("model"), None)
    refs = table.get("references", [])
    if not isinstance(refs, list) or len(refs) > MAX_REFERENCES:
        raise LatencyTableError(f"references must be a list of at most {MAX_REFERENCES} "
                                f"{{\"arch\": an arch object, \"ms\": a number in (0, {MAX_MS:g}]}}")
    for i, r in enumerate(refs):
        if not (isinstance(r, Mapping) and set(r) == {"arch", "ms"} and _real(0, MAX_MS)(r["ms"]) and r["ms"] > 0):
            raise LatencyTableError(f"references[{i}] must be {{\"arch\": an arch object, \"ms\": a number in "
                                    f"(0, {MAX_MS:g}]}}")
