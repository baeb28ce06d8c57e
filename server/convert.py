"""Proto <-> domain conversion, in one place: every request field is checked here, once (a bad one becomes
INVALID_ARGUMENT naming it and its range), and every response message is built here from the domain
values (``Arch``, ``Candidate``, a latency table...)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Container, Mapping

import grpc

from ofa.export import FORMATS, PRECISIONS, run_format, writable
from ofa.predict.latency import LatencyTableError, Speed, check_target_name, table_format, table_noise
from ofa.predict.timing import ONNX_BACKENDS
from ofa.search import Candidate, Constraints, SearchSettings
from ofa.space import Arch, ArchError, SearchSpace
from ofa_client.flags import bounded as _cut
from ofa_client.values import WEIGHTS_FORMATS
from ofa_client.v1 import subnet_service_pb2 as pb

if TYPE_CHECKING:
    from ofa.artifact import Artifact
    from ofa.predict.accuracy import AccuracyPredictor
    from ofa.search.load import Measured

    from ofa.export import SubnetFile

__all__ = ["LIMITS", "MESSAGE_CHARS", "RequestError", "arch_of", "arch_to_pb", "bounded", "check_work",
           "constraints_of", "format_of", "invalid", "kit_format_of", "points_of", "settings_of", "speed_of_timings",
           "subnet_id_of",
           "subnet_to_pb", "supernet_to_pb", "target_of", "target_to_pb", "weights_header"]

# Bounds on what one request may ask of the server, fixed by the API (the ones an operator sets, a table's
# bytes and a search's work, are ServeConfig's: server/args.py).
LIMITS = {"population": (2, 1000), "generations": (1, 2000), "points": (1, 50),
          "max_latency_ms": 1e6, "max_macs": 10**13, "max_params": 10**12,
          "min_ms": 1e-6,  # a timing of less than a nanosecond is not one (5e-324 passed "> 0")
          # reference timings a search may carry (the device speeds they may imply: ofa.predict.latency.SPEED_RANGE)
          "reference_timings": 64, "passes": 16}
DEFAULT_POPULATION, DEFAULT_GENERATIONS, DEFAULT_FRONT_GENERATIONS, DEFAULT_POINTS = 100, 500, 100, 10

_FORMATS = {value: name for name, value in WEIGHTS_FORMATS.items() if name in FORMATS}  # the API's, served here


MESSAGE_CHARS = 1000  # default cap on a status message and its log line (client input is echoed in them)


def bounded(text: str, limit: int = MESSAGE_CHARS) -> str:
    """:func:`ofa_client.flags.bounded` at the server's cap on a status message and its log line."""
    return _cut(text, limit)


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> RequestError:
    """INVALID_ARGUMENT with ``message``: the request itself is wrong."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def target_of(value: str, required: bool = False) -> str | None:
    """The target name a request gives (None when empty and not ``required``), checked as a table's name is."""
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
    """The search constraints of a request, each bound checked against its range and the space."""
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
    if len(c.resolutions) > len(space.resolutions):  # the length first: a long list is never walked
        raise invalid(f"constraints.resolutions must be distinct values from {list(space.resolutions)}, got "
                      f"{len(c.resolutions)} values")
    res = list(c.resolutions)
    if any(r not in space.resolutions for r in res) or len(set(res)) != len(res):
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
    """Population, generations (0: the default of a search or a ``front``) and seed of a request."""
    return SearchSettings(population=_bounded("population", options.population, DEFAULT_POPULATION),
                          generations=_bounded("generations", options.generations,
                                               DEFAULT_FRONT_GENERATIONS if front else DEFAULT_GENERATIONS),
                          seed=int(seed))


def check_work(settings: SearchSettings, points: int, limit: int) -> None:
    """A search's population x generations (x points for a front, one search per point) is bounded, so that
    no one request holds a search slot for long (``ofa serve --max-search-work``)."""
    work = settings.population * settings.generations * points
    if work > limit:
        shape = f"{settings.population} x {settings.generations}" + (f" x {points}" if points > 1 else "")
        raise invalid(f"options.population x options.generations{' x points' if points > 1 else ''} must be at most "
                      f"{limit:,} (--max-search-work), got {shape} = {work:,}")


def points_of(value: int) -> int:
    """The number of points a front asks for (0: the default)."""
    if value == 0:
        return DEFAULT_POINTS
    lo, hi = LIMITS["points"]
    if not lo <= value <= hi:
        raise invalid(f"points must be in {lo}..{hi} (0: the default {DEFAULT_POINTS}), got {value}")
    return value


def arch_of(msg: pb.Arch, space: SearchSpace) -> Arch:
    """The :class:`Arch` a ``pb.Arch`` describes, validated against ``space``."""
    for name, most in (("kernel", space.num_slots), ("expand", space.num_slots), ("depth", len(space.stages))):
        if len(getattr(msg, name)) > most:  # the length first: a long list is never walked
            raise invalid(f"arch.{name} must hold at most {most} values for space {space.name!r}, got "
                          f"{len(getattr(msg, name))}")
    try:
        return space.validate(Arch(tuple(msg.kernel), tuple(msg.expand), tuple(msg.depth), msg.resolution))
    except (ArchError, ValueError, TypeError) as e:
        raise invalid(f"arch: {e}") from None


def _writable(name: str) -> str:
    """``name`` (a row of :data:`ofa.export.FORMATS`), refused with FAILED_PRECONDITION where the package its
    writer needs is not installed where the server runs."""
    try:
        return writable(name).name
    except ValueError as e:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"this server cannot write it: {e}") from None


def format_of(value: int) -> str:
    """The name (a row of :data:`ofa.export.FORMATS`) of a ``pb.WeightsFormat`` value."""
    if value not in _FORMATS:
        names = [pb.WeightsFormat.Name(v) for v in _FORMATS]
        raise invalid(f"format must be one of {names}, got {value}")
    return _writable(_FORMATS[value])


def kit_format_of(precision: str, runtime: str) -> str:
    """The served format a profile kit stands for, from its precision ("" is fp32) and runtime ("" is
    onnxruntime) as a request gives them."""
    precision, runtime = precision or "fp32", runtime or ONNX_BACKENDS[0]
    if precision not in PRECISIONS:
        raise invalid(f"precision must be one of {list(PRECISIONS)}, got {precision[:40]!r}")
    if runtime not in ONNX_BACKENDS:
        raise invalid(f"runtime must be one of {list(ONNX_BACKENDS)}, got {runtime[:40]!r}")
    return _writable(run_format(runtime, precision))


def subnet_id_of(value: str) -> str:
    """A subnet id as a request gives it: 16 lowercase hex digits."""
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
    then, now, passes, seen = [], [], [], set()
    for i, t in enumerate(timings):
        if t.subnet_id not in profiled:
            raise invalid(f"reference_timings[{i}].subnet_id {t.subnet_id[:40]!r} is not a reference subnet of "
                          f"target {target!r}; its references are {sorted(profiled)} (see ListTargets)")
        if not 0 <= t.pass_index < LIMITS["passes"]:
            raise invalid(f"reference_timings[{i}].pass_index must be in [0, {LIMITS['passes'] - 1}], "
                          f"got {t.pass_index}")
        if (t.subnet_id, t.pass_index) in seen:
            raise invalid(f"reference_timings[{i}].subnet_id {t.subnet_id} is given twice in pass {t.pass_index}")
        seen.add((t.subnet_id, t.pass_index))
        if not math.isfinite(t.ms) or not LIMITS["min_ms"] <= t.ms <= LIMITS["max_latency_ms"]:
            raise invalid(f"reference_timings[{i}].ms must be a number in [{LIMITS['min_ms']:g}, "
                          f"{LIMITS['max_latency_ms']:g}], got {t.ms!r}")
        then.append(profiled[t.subnet_id])
        now.append(t.ms)
        passes.append(t.pass_index)
    try:
        speed = Speed.fit_passes(then, now, passes)  # a LinAlgError is a ValueError too
    except (ValueError, ArithmeticError) as e:
        raise invalid(f"reference_timings fit no speed to the target's references ({str(e)[:80]})") from None
    try:
        speed.check_range(then)
    except ValueError as e:
        raise invalid(f"reference_timings {e}") from None
    return speed


# ---- responses ---------------------------------------------------------------------
def arch_to_pb(arch: Arch) -> pb.Arch:
    """The ``pb.Arch`` of an :class:`Arch` (the one place it is built)."""
    return pb.Arch(kernel=arch.kernel, expand=arch.expand, depth=arch.depth, resolution=arch.resolution)


def subnet_to_pb(c: Candidate, seconds: float, supernet: str, target: str | None, speed: Speed,
                 fine_tuned: Container[str] = (), level: float = 0.0,
                 measured: "Mapping[str, Measured] | None" = None, table: dict[str, Any] | None = None,
                 digest: str = "") -> pb.Subnet:
    """A searched subnet as answered: ``speed`` is the device speed the latency was predicted at;
    ``fine_tuned``: the ids whose weights the artifact holds fine-tuned; ``level``: the accuracy
    interval's; ``measured``: accuracies measured on the artifact's weights; ``table``: the target's;
    ``digest``: the supernet's (a fetch's header must name the same)."""
    msg = pb.Subnet(id=c.arch.id, arch=arch_to_pb(c.arch), predicted_accuracy=c.accuracy, macs=c.macs,
                    params=c.params, search_seconds=seconds, supernet=supernet, target=target or "",
                    supernet_digest=digest,
                    speed=speed.scale if target else 0.0, speed_offset_ms=speed.offset_ms if target else 0.0,
                    speed_spread=speed.spread if target else 0.0, speed_passes=speed.passes if target else 0,
                    fine_tuned=c.arch.id in fine_tuned, extrapolated=c.extrapolated,
                    latency_noisy=bool(table and table_noise(table)))
    if c.latency_ms is not None:
        msg.predicted_latency_ms = c.latency_ms
    if c.accuracy_low is not None and c.accuracy_high is not None:
        msg.predicted_accuracy_interval.CopyFrom(pb.AccuracyInterval(
            low=c.accuracy_low, high=c.accuracy_high, level=level, measured_distance=c.measured_distance or 0.0))
    m = (measured or {}).get(c.arch.id)
    if m is not None:
        msg.measured_accuracy.CopyFrom(pb.MeasuredAccuracy(accuracy=m.accuracy, split=m.split, images=m.images))
    return msg


def supernet_to_pb(name: str, artifact: "Artifact", accuracy: "AccuracyPredictor | None",
                   targets: list[str]) -> pb.Supernet:
    """A served supernet: its space, data, targets and (when it has one) its accuracy predictor's quality."""
    sp, data = artifact.space, artifact.data
    space = pb.SearchSpace(name=sp.name, kernel_choices=sp.kernel_choices, expand_choices=sp.expand_choices,
                           depth_choices=sp.depth_choices, resolutions=sp.resolutions,
                           stages=[pb.Stage(width=s.width, stride=s.stride, activation=s.act, squeeze_excite=s.se)
                                   for s in sp.stages],
                           in_channels=sp.in_channels, num_classes=sp.num_classes, definition_json=sp.to_json())
    msg = pb.Supernet(name=name, digest=artifact.digest, space=space,
                      data=pb.DataDescription(dataset=data.name, channels=data.channels, image_size=data.image_size,
                                              num_classes=data.num_classes, mean=data.mean, std=data.std,
                                              class_names=data.class_names),
                      targets=targets)
    if accuracy is not None:
        test = accuracy.info.get("test", {})
        msg.accuracy_predictor.CopyFrom(pb.PredictorQuality(
            family=accuracy.family, train_samples=int(accuracy.info.get("train_samples", 0)),
            test_samples=int(accuracy.info.get("test_samples", 0)),
            kendall_tau=float(test.get("kendall_tau", 0.0)), rmse=float(test.get("rmse", 0.0)),
            kendall_tau_ceiling=float(test.get("tau_ceiling", 0.0)),
            interval_level=accuracy.interval.level if accuracy.interval is not None else 0.0,
            interval_coverage=float(test.get("interval_coverage", 0.0)),
            interval_half_width=float(test.get("interval_half_width", 0.0))))
        if accuracy.shift is not None:
            msg.accuracy_predictor.test_shift = accuracy.shift.offset
    return msg


def target_to_pb(name: str, supernet: str, table: dict[str, Any], source: str) -> pb.Target:
    """A target of a validated latency table; ``source`` is "artifact" or "registered"."""
    dev = table.get("device", {})
    held = ((table.get("fit") or {}).get("quality") or {}).get("held_out") or {}
    refs = []
    for r in table.get("references", []):
        a = Arch.from_dict(r["arch"])
        refs.append(pb.ReferenceSubnet(subnet_id=a.id, profiled_ms=float(r["ms"]), arch=arch_to_pb(a)))
    speed = Speed.from_dict(table.get("recalibration"))
    return pb.Target(name=name, supernet=supernet, cpu=str(dev.get("cpu", "")),
                     threads=int(dev.get("threads", 0) or 0), backend=str(dev.get("backend", "")),
                     backend_version=str(dev.get("backend_version", "")), batch=int(dev.get("batch", 1) or 1),
                     blocks=len(table["entries"]), mean_abs_rel_error=float(held.get("mean_abs_rel_error", 0.0)),
                     source=source, references=refs, held_out_within_10pct=float(held.get("within_10pct", 0.0)),
                     held_out_spearman=float(held.get("spearman", 0.0)),
                     model_family=str(table["model"]["family"]), speed=speed.scale, speed_offset_ms=speed.offset_ms,
                     speed_spread=speed.spread, speed_passes=speed.passes, noisy=bool(table_noise(table)), noise=table_noise(table),
                     precision=str(dev.get("precision", "fp32")),
                     weights_format=WEIGHTS_FORMATS.get(table_format(table) or "", pb.WEIGHTS_FORMAT_UNSPECIFIED))


def weights_header(fmt: int, payload: "SubnetFile", arch: Arch, artifact: "Artifact") -> pb.WeightsHeader:
    """The first message of a weights stream: what follows (format, size, hash) and how to feed the subnet."""
    d = artifact.data
    return pb.WeightsHeader(format=fmt, total_bytes=len(payload.data), sha256=payload.sha256, subnet_id=arch.id,
                            arch=arch_to_pb(arch), input_shape=[1, d.channels, arch.resolution, arch.resolution],
                            mean=d.mean, std=d.std, supernet_digest=artifact.digest,
                            calibration_images=payload.calibration_images, fine_tuned=payload.fine_tuned)
