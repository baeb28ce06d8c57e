"""What the client's calls take and return: search results, verified downloads, reference timings, archs.

Needs only protobuf (and the standard library); ``Weights.load_module`` imports torch when called.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .v1 import subnet_service_pb2 as pb

__all__ = ["WEIGHTS_FORMATS", "SubnetInfo", "Weights", "arch_to_dict", "arch_to_pb", "check_target_name",
           "format_name", "reference_timings_of", "save_atomically"]


def format_name(value: int) -> str:
    """The name of a ``WeightsFormat`` value: the enum name without its prefix, lower case (``onnx``)."""
    return pb.WeightsFormat.Name(value).removeprefix("WEIGHTS_FORMAT_").lower()


# {name: WeightsFormat value} of every format the API serves: the client's and the server's one list of them
WEIGHTS_FORMATS = {format_name(v): v for v in pb.WeightsFormat.values() if v != pb.WEIGHTS_FORMAT_UNSPECIFIED}


def arch_to_dict(a: pb.Arch) -> dict[str, Any]:
    return {"kernel": list(a.kernel), "expand": list(a.expand), "depth": list(a.depth), "resolution": a.resolution}


def reference_timings_of(value: Any) -> list[pb.ReferenceTiming]:
    """Reference timings as messages, from {subnet_id: ms}, a list of {"subnet_id", "ms"} objects (each with a
    "pass_index" when the references were timed in several passes), or the path (or JSON object) of a file
    written by ``ofa profile --recalibrate --timings-out`` (its ``reference_timings``). A wrong shape is a
    ValueError naming the field."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        try:
            value = json.loads(Path(value).read_text())
        except (ValueError, RecursionError) as e:
            why = "nests too deeply" if isinstance(e, RecursionError) else f"not JSON ({e})"
            raise ValueError(f"reference timings file {str(value)[:200]}: {why}") from None
    if isinstance(value, Mapping) and "reference_timings" in value:
        value = value["reference_timings"]
    if isinstance(value, Mapping):
        value = [{"subnet_id": k, "ms": v} for k, v in value.items()]
    if not isinstance(value, (list, tuple)):
        raise ValueError("reference_timings must be a list of {\"subnet_id\": id, \"ms\": number}")
    out = []
    for i, t in enumerate(value):
        if (not isinstance(t, Mapping) or not isinstance(t.get("subnet_id"), str)
                or isinstance(t.get("ms"), bool) or not isinstance(t.get("ms"), (int, float))
                or not _int(t.get("pass_index", 0)) or not 0 <= t.get("pass_index", 0) < 2**31):
            raise ValueError(f"reference_timings[{i}] must be {{\"subnet_id\": id, \"ms\": number}} (and "
                             f"\"pass_index\": an integer >= 0 for one of several passes), got {t!r}"[:200])
        out.append(pb.ReferenceTiming(subnet_id=t["subnet_id"], ms=float(t["ms"]), pass_index=t.get("pass_index", 0)))
    return out


def save_atomically(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path``: a new temporary file of its own beside it (created exclusively, so never
    through a symlink), fsynced, then renamed over ``path``; nothing is left behind on failure. Its mode is
    what the umask gives a new file (mkstemp's 0600 kept a pipeline's other users out)."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut once the folder is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def check_target_name(target: Any) -> str:
    """A target name is also a file name: 1-64 of letters, digits, '-', '_', '.' (not leading '.'); a ValueError
    otherwise (the one rule: the server's table check and the client's profile use it)."""
    if (not isinstance(target, str) or not 0 < len(target) <= 64 or target.startswith(".")
            or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in target)):
        raise ValueError("target must be 1-64 characters of letters, digits, '-', '_' or '.' "
                         f"(not starting with '.'); got {str(target)[:80]!r}")
    return target


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread a moment)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def arch_to_pb(arch: Any) -> pb.Arch:
    """An arch dict as the message; a wrong shape is a ValueError naming the field (the server checks the values)."""
    if not isinstance(arch, Mapping):
        raise ValueError(f"arch must be an object with kernel, expand, depth and resolution, got {type(arch).__name__}")
    for key in ("kernel", "expand", "depth"):
        if not isinstance(arch.get(key), (list, tuple)) or not all(_int(x) for x in arch[key]):
            raise ValueError(f"arch.{key} must be a list of integers, got {arch.get(key)!r}"[:200])
    if not _int(arch.get("resolution")):
        raise ValueError(f"arch.resolution must be an integer, got {arch.get('resolution')!r}"[:200])
    return pb.Arch(kernel=arch["kernel"], expand=arch["expand"], depth=arch["depth"], resolution=arch["resolution"])


# passes re-timing the same references whose levels lie further apart than this: the device's speed was
# unsettled while it was measured, and a latency predicted at it may be off by about as much
SPEED_TOLERANCE = 0.05


@dataclass(frozen=True)
class SubnetInfo:
    """A search result: the subnet's id and arch, its predictions and exact cost, and where it was found."""

    id: str
    arch: dict[str, Any]
    predicted_accuracy: float
    predicted_latency_ms: float | None
    macs: int
    params: int
    search_seconds: float
    supernet: str
    target: str
    # the device speed the latency prediction used: speed x as profiled + speed_offset_ms (1, 0: as profiled)
    speed: float = 0.0
    speed_offset_ms: float = 0.0
    fine_tuned: bool = False  # the server holds this subnet fine-tuned: a fetch returns those weights
    # predicted_accuracy lies in [low, high] with probability interval_level (None: the predictor has no interval)
    predicted_accuracy_low: float | None = None
    predicted_accuracy_high: float | None = None
    interval_level: float | None = None
    measured_distance: float | None = None  # arch choices to the nearest measured subnet
    extrapolated: bool = False  # outside what the predictor was fitted on: trust the prediction less
    # this very subnet's accuracy as measured by the server's artifact (None: never measured), and on what split
    measured_accuracy: float | None = None
    measured_split: str = ""
    measured_images: int = 0
    latency_noisy: bool = False  # the target's table was profiled on a machine too noisy to trust (see targets)
    supernet_digest: str = ""  # the supernet the search ran on: a fetch of this subnet must get its weights ("": API < 1.3)
    # how far the passes that timed the references put the speed apart (relative), over how many (0: API < 1.6)
    speed_spread: float = 0.0
    speed_passes: int = 0

    @classmethod
    def from_pb(cls, m: pb.Subnet) -> "SubnetInfo":
        """The result in a ``Subnet`` message (no latency prediction without a target: None; no interval
        or measurement from a server that sends none, API 1.1 and older)."""
        iv = m.predicted_accuracy_interval if m.HasField("predicted_accuracy_interval") else None
        ma = m.measured_accuracy if m.HasField("measured_accuracy") else None
        return cls(m.id, arch_to_dict(m.arch), m.predicted_accuracy,
                   m.predicted_latency_ms if m.HasField("predicted_latency_ms") else None,
                   m.macs, m.params, m.search_seconds, m.supernet, m.target, m.speed, m.speed_offset_ms, m.fine_tuned,
                   iv.low if iv else None, iv.high if iv else None, iv.level if iv else None,
                   iv.measured_distance if iv else None, m.extrapolated,
                   ma.accuracy if ma else None, ma.split if ma else "", ma.images if ma else 0, m.latency_noisy,
                   m.supernet_digest, m.speed_spread, m.speed_passes)

    @property
    def speed_unsettled(self) -> bool:
        """The reference timings' passes disagreed on the device's speed by more than :data:`SPEED_TOLERANCE`:
        the latency prediction may be off by about :attr:`speed_spread`."""
        return self.speed_spread > SPEED_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (what ``ofa-client search --json`` prints; :meth:`Client.fetch` takes it)."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Weights:
    """A verified download: the bytes and what the header said about them."""

    data: bytes = field(repr=False)
    format: str
    sha256: str
    subnet_id: str
    arch: dict[str, Any]
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    supernet_digest: str
    fine_tuned: bool = False  # the artifact's fine-tuned subnet (ofa finetune), not the supernet's shared weights

    def save(self, path: str | Path) -> Path:
        """Write the bytes to ``path`` atomically (:func:`save_atomically`)."""
        return save_atomically(path, self.data)

    def load_module(self):
        """The subnet as a ready ``torch.nn.Module`` in eval mode (safetensors or TorchScript; needs torch)."""
        import io

        import torch

        if self.format == format_name(pb.WEIGHTS_FORMAT_TORCHSCRIPT):
            return torch.jit.load(io.BytesIO(self.data), map_location="cpu").eval()
        if self.format != format_name(pb.WEIGHTS_FORMAT_SAFETENSORS):
            raise ValueError("load_module takes safetensors or torchscript weights; run ONNX with onnxruntime")
        try:
            from ofa.export import read_subnet
        except ImportError:
            raise ImportError("load_module of safetensors weights builds the network with the server project's "
                              "package ofa (pip install it next to ofa-client), or fetch the torchscript format, "
                              "which needs torch only") from None

        return read_subnet(self.data)[0]
