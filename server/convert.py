"""Every request field is checked here, once: a bad one becomes INVALID_ARGUMENT naming it and its range."""
from __future__ import annotations

import math

import grpc

from ofa.predict.latency import LatencyTableError, Speed, check_target_name
from ofa.search import Constraints, SearchSettings
from ofa.space import Arch, ArchError, SearchSpace
from ofa_client.v1 import subnet_service_pb2 as pb

__all__ = ["MESSAGE_CHARS", "RequestError", "arch_of", "bounded", "check_work", "constraints_of", "format_of", "settings_of", "target_of",
           "points_of", "speed_of_timings", "LIMITS"]

# Bounds on what one request may ask of the server.
LIMITS = {"population": (2, 1000), "generations": (1, 2000), "points": (1, 50),
          # a registered table as stored (a real one is ~16 KB); each is kept parsed by every replica
          "table_bytes": 1 << 20,
          "max_latency_ms": 1e6, "max_macs": 10**13, "max_params": 10**12,
          # a front's population x generations x points: 100 default searches' worth (~10 s on
          # 2 cores), so that no one request holds a search slot for minutes
          "work": 5_000_000,
          # reference timings a search may carry, and the device speeds they may imply
          "reference_timings": 64, "speed": (0.01, 100.0)}
DEFAULT_POPULATION, DEFAULT_GENERATIONS, DEFAULT_FRONT_GENERATIONS, DEFAULT_POINTS = 100, 500, 100, 10

_FORMATS = {pb.WEIGHTS_FORMAT_SAFETENSORS: "safetensors", pb.WEIGHTS_FORMAT_ONNX: "onnx",
            pb.WEIGHTS_FORMAT_TORCHSCRIPT: "torchscript"}


MESSAGE_CHARS = 1000  # default cap on a status message and its log line (client input is echoed in them)


def bounded(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was cut: a status message or log line
    never carries unbounded client input (a 10 MB target name once went into the log whole)."""
    if len(text) <= limit:
        return text
    keep = limit
    while True:  # the note's own length decides how much is kept, and so what it says: a few steps
        tail = f"... ({len(text) - keep} more characters cut)"
        if keep + len(tail) <= limit or keep == 0:
            return text[:keep] + tail[: limit - keep]
        keep = max(0, limit - len(tail))


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def target_of(value: str, required: bool = False) -> str | None:
    if not value:
        if required:
            raise invalid("target is required")
        return None
    try:
        return check_target_name(value)
    except LatencyTableError as e:
        raise invalid(str(e)) from None


def _positive(name: str, value: float, limit: float) -> float:
    if not math.isfinite(value) or not 0 < value <= limit:
        raise invalid(f"constraints.{name} must be a number in (0, {limit:g}], got {value!r}")
    return value


def constraints_of(c: pb.Constraints, space: SearchSpace, target: str | None) -> Constraints:
    max_latency = max_macs = max_params = min_acc = None
    if c.HasField("max_latency_ms"):
        if target is None:
            raise invalid("constraints.max_latency_ms needs a target (see ListTargets)")
        max_latency = _positive("max_latency_ms", c.max_latency_ms, LIMITS["max_latency_ms"])
    if c.HasField("max_macs"):
        max_macs = int(_positive("max_macs", c.max_macs, LIMITS["max_macs"]))
    if c.HasField("max_params"):
        max_params = int(_positive("max_params", c.max_params, LIMITS["max_params"]))
    if c.HasField("min_accuracy"):
        if not math.isfinite(c.min_accuracy) or not 0 <= c.min_accuracy <= 100:
            raise invalid(f"constraints.min_accuracy must be a percentage in [0, 100], got {c.min_accuracy!r}")
        min_acc = c.min_accuracy
    res = list(c.resolutions)
    if len(res) > len(space.resolutions) or any(r not in space.resolutions for r in res) or len(set(res)) != len(res):
        raise invalid(f"constraints.resolutions must be distinct values from {list(space.resolutions)}, got {res[:40]}")
    return Constraints(max_latency, max_macs, max_params, tuple(sorted(res)), min_acc)


def _bounded(name: str, value: int, default: int) -> int:
    if value == 0:
        return default
    lo, hi = LIMITS[name]
    if not lo <= value <= hi:
        raise invalid(f"options.{name} must be in {lo}..{hi} (0: the default {default}), got {value}")
    return value


def settings_of(options: pb.SearchOptions, seed: int, front: bool = False) -> SearchSettings:
    return SearchSettings(population=_bounded("population", options.population, DEFAULT_POPULATION),
                          generations=_bounded("generations", options.generations,
                                               DEFAULT_FRONT_GENERATIONS if front else DEFAULT_GENERATIONS),
                          seed=int(seed))


def check_work(settings: SearchSettings, points: int, limit: int = LIMITS["work"]) -> None:
    """A search's population x generations (x points for a front, one search per point) is bounded, so that
    no one request holds a search slot for long (``ofa serve --max-search-work``)."""
    work = settings.population * settings.generations * points
    if work > limit:
        shape = f"{settings.population} x {settings.generations}" + (f" x {points}" if points > 1 else "")
        raise invalid(f"options.population x options.generations{' x points' if points > 1 else ''} must be at most "
                      f"{limit:,} (--max-search-work), got {shape} = {work:,}")


def points_of(value: int) -> int:
    if value == 0:
        return DEFAULT_POINTS
    lo, hi = LIMITS["points"]
    if not lo <= value <= hi:
        raise invalid(f"points must be in {lo}..{hi} (0: the default {DEFAULT_POINTS}), got {value}")
    return value


def arch_of(msg: pb.Arch, space: SearchSpace) -> Arch:
    try:
        return space.validate(Arch(tuple(msg.kernel), tuple(msg.expand), tuple(msg.depth), msg.resolution))
    except (ArchError, ValueError, TypeError) as e:
        raise invalid(f"arch: {e}") from None


def format_of(value: int) -> str:
    if value not in _FORMATS:
        names = [pb.WeightsFormat.Name(v) for v in _FORMATS]
        raise invalid(f"format must be one of {names}, got {value}")
    return _FORMATS[value]


def subnet_id_of(value: str) -> str:
    if len(value) != 16 or any(c not in "0123456789abcdef" for c in value):
        raise invalid(f"subnet_id must be 16 lowercase hex digits, got {value[:40]!r}")
    return value


def speed_of_timings(timings, table: dict | None, target: str | None) -> Speed | None:
    """The device speed that a request's ``reference_timings`` imply (fitted on the references), or None."""
    if not timings:
        return None
    if target is None or table is None:
        raise invalid("reference_timings needs a target (see ListTargets)")
    if len(timings) > LIMITS["reference_timings"]:
        raise invalid(f"reference_timings may hold at most {LIMITS['reference_timings']} timings, got {len(timings)}")
    profiled = {Arch.from_dict(r["arch"]).id: float(r["ms"]) for r in table.get("references", [])}
    then, now, seen = [], [], set()
    for i, t in enumerate(timings):
        if t.subnet_id not in profiled:
            raise invalid(f"reference_timings[{i}].subnet_id {t.subnet_id[:40]!r} is not a reference subnet of "
                          f"target {target!r}; its references are {sorted(profiled)} (see ListTargets)")
        if t.subnet_id in seen:
            raise invalid(f"reference_timings[{i}].subnet_id {t.subnet_id} is given twice")
        seen.add(t.subnet_id)
        if not math.isfinite(t.ms) or not 0 < t.ms <= LIMITS["max_latency_ms"]:
            raise invalid(f"reference_timings[{i}].ms must be a number in (0, {LIMITS['max_latency_ms']:g}], "
                          f"got {t.ms!r}")
        then.append(profiled[t.subnet_id])
        now.append(t.ms)
    speed = Speed.fit(then, now)
    lo, hi = LIMITS["speed"]
    ratios = speed.apply(then) / then
    if not (lo <= ratios.min() and ratios.max() <= hi):
        raise invalid(f"reference_timings imply the device runs at {speed.describe()} of its profiled time; only "
                      f"x{lo:g} to x{hi:g} is accepted (were they timed on this target's device and runtime?)")
    return speed
