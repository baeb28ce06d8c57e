"""The subnet as served: the one table of formats (name -> writer and reader) and the one function from
(artifact, arch, format) to bytes.

A served subnet is the artifact's fine-tuned subnet of the arch where ``ofa finetune`` recorded one,
else the arch extracted from the supernet with its BN re-calibrated (:func:`ofa.calibrate.served_subnet`).
:func:`subnet_file` makes that choice and writes it in a format of :data:`FORMATS`; a new format is one
row there (and one value of the API's ``WeightsFormat`` enum). Everything else that names a format (the
server's cache, the client through the proto enum, the report, the timing worker, ``ofa finetune``) takes
it from this table.

A subnet's safetensors file carries one canonical JSON value under the metadata key ``ofa``
(:data:`SUBNET_FORMAT`, :data:`SUBNET_VERSION`, the arch, the search space, the data description, the
supernet's digest and how many images calibrated its BN), so the file alone rebuilds the network
(:func:`read_subnet`). Every writer is deterministic: the same module gives the same bytes in any process.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ofa_client.timing import PRECISIONS

from ._io import ArtifactError, write_temp
from ._torch import num_threads, seeded
from .quantize import quantize_nncf, quantize_onnx
from .space import Arch, SearchSpace
from .subnet import SubNet, load_subnet, module_of

if TYPE_CHECKING:
    from .artifact import Artifact, ArtifactFiles

__all__ = ["ExportKilled", "FORMATS", "Format", "ONNX_OPSET", "OnnxModel", "OpenVinoModel", "PRECISIONS", "RECORDED",
           "SCRIPT_TIMEOUT_S",
           "SUBNET_FORMAT", "SUBNET_VERSION", "Served", "SubnetFile", "canonical_json", "export_onnx",
           "export_parts", "export_torchscript", "finetuned_archs", "format_of", "read_subnet", "run_format",
           "writable",
           "subnet_file", "subnet_file_metadata", "subnet_metadata", "write_safetensors"]

SUBNET_FORMAT, SUBNET_VERSION = "ofa-subnet", 1
ONNX_OPSET = 17  # HardSwish needs >= 14
SCRIPT_TIMEOUT_S = 300.0  # a TorchScript export still running after this is killed; the call may retry
_NOT_SUBNET_FILE = "not a served subnet safetensors file (metadata key 'ofa' with arch and space)"


class ExportKilled(RuntimeError):
    """An export's child process was killed by a signal (the OOM killer, an operator): the same request can
    succeed, so a server answers UNAVAILABLE."""


def canonical_json(value: Mapping[str, Any]) -> str:
    """The one JSON form of a file's metadata: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def subnet_metadata(arch: Arch, space: SearchSpace, data: Mapping[str, Any], supernet_digest: str,
                    calibration_images: int, finetuned: Mapping[str, Any] | None = None) -> str:
    """The ``ofa`` metadata of a served subnet's file (:func:`canonical_json`); ``finetuned``: what
    ``ofa finetune`` did (epochs, settings, accuracies), for a fine-tuned subnet only."""
    meta = {"format": SUBNET_FORMAT, "version": SUBNET_VERSION, "arch": arch.to_dict(), "id": arch.id,
            "space": space.to_dict(), "data": dict(data), "supernet_digest": supernet_digest,
            "calibration_images": calibration_images}
    if finetuned is not None:
        meta["finetuned"] = dict(finetuned)
    return canonical_json(meta)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def write_safetensors(module: nn.Module, metadata: str) -> bytes:
    """``module``'s state as safetensors bytes with ``metadata`` (:func:`subnet_metadata`) under ``ofa``."""
    from safetensors.torch import save

    return save(_tensors(module), metadata={"ofa": metadata})


def subnet_file_metadata(data: bytes) -> dict[str, Any]:
    """The ``ofa`` metadata of a served subnet safetensors file (its bytes), read from the header alone."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["ofa"])
        if not isinstance(meta, dict):
            raise TypeError("the metadata is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{_NOT_SUBNET_FILE}: {e}") from None
    return meta


def read_subnet(data: bytes) -> tuple[SubNet, dict[str, Any]]:
    """The subnet in a served safetensors file (its bytes) and the file's ``ofa`` metadata.

    Refused with a ValueError that says why: not such a file, another format or version,
    tensors that do not fit the arch, or of another dtype than served (float32; BN counters int64).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    meta = subnet_file_metadata(data)
    try:
        space, arch = SearchSpace.from_dict(meta["space"]), Arch.from_dict(meta["arch"])
        tensors = load(data)
    except (ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ValueError(f"{_NOT_SUBNET_FILE}: {e}") from None
    if (meta.get("format"), meta.get("version")) != (SUBNET_FORMAT, SUBNET_VERSION):
        raise ValueError(f"the file's metadata says format {meta.get('format')!r} version {meta.get('version')!r}; "
                         f"this build reads {SUBNET_FORMAT!r} version {SUBNET_VERSION}")
    for key, value in tensors.items():
        want = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        if value.dtype != want:
            raise ValueError(f"{key} has dtype {value.dtype}, expected {want}")
    return load_subnet(space, arch, tensors).eval(), meta


def export_onnx(module: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> bytes:
    """``module`` (in eval mode) as ONNX bytes, input ``image`` and output ``logits``.

    Uses the TorchScript-based exporter: for these static networks it is about ten
    times faster here than the dynamo path and gives the same bytes on every call.
    """
    buf = io.BytesIO()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buf, opset_version=ONNX_OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_axes=axes, dynamo=False)
    return buf.getvalue()


def export_torchscript(module: nn.Module, metadata: str) -> bytes:
    """TorchScript bytes of a subnet, scripted in a new interpreter (:mod:`ofa._torchscript_child`).

    The scripted code names specialised module classes with a per-process counter
    (``___torch_mangle_N``), so the same subnet scripted after others gives other bytes;
    a fresh process makes the bytes a function of the subnet alone. ``metadata`` (the
    safetensors file's) is stored in the archive as ``ofa.json``.
    """
    from safetensors.torch import save

    # A clean environment (the scripted code lists module constants in set order, which follows string
    # hashing: a fixed seed), no user site-packages (-s) and not the working directory on the path (-P):
    # a torch.py or ofa.py where the server was started is never imported.
    env = {"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"}
    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run([sys.executable, "-s", "-P", str(here / "_torchscript_child.py"), str(here.parent)],
                              input=metadata.encode() + b"\n" + save(_tensors(module)), capture_output=True,
                              check=False, env=env, cwd="/", timeout=SCRIPT_TIMEOUT_S,
                              start_new_session=True)  # a Ctrl-C to the group must not fail a drain's calls
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the TorchScript export took longer than {SCRIPT_TIMEOUT_S:g} s and was stopped; "
                           f"retry") from None
    if proc.returncode < 0:
        raise ExportKilled(f"the TorchScript export's process was killed (signal {-proc.returncode}); retry")
    if proc.returncode != 0:
        raise RuntimeError(f"TorchScript export failed: {proc.stderr.decode()[-2000:]}")
    return _canonical_archive(proc.stdout)


def _canonical_archive(data: bytes) -> bytes:
    """The TorchScript zip rewritten so that its bytes are a function of the subnet and torch alone.

    Without its ``.debug_pkl`` records: they hold source locations, the path and line numbers of
    this package's files where the server runs, so two installs (or a release that only moved
    lines) served two byte streams; torch loads and runs an archive without them. With fixed
    timestamps, and ``.data/serialization_id`` (random on every save) replaced by digits of the
    other records' sha256.
    """
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    records = [(i.filename, src.read(i)) for i in src.infolist() if not i.filename.endswith(".debug_pkl")]
    digest = hashlib.sha256(b"".join(name.encode() + body for name, body in records
                                     if not name.endswith(".data/serialization_id"))).hexdigest()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, body in records:
            if name.endswith(".data/serialization_id"):
                body = str(int(digest, 16)).zfill(len(body))[-len(body):].encode()
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3  # as written on Linux, wherever it is written
            archive.writestr(info, body)
    return out.getvalue()


# ---- the table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """What a writer writes: the subnet (eval mode), its arch, its file metadata (:func:`subnet_metadata`)
    and the input channels of the space (the example input of a tracing exporter)."""

    module: nn.Module
    arch: Arch
    metadata: str
    in_channels: int
    # the calibration batches of a quantizing writer (the served calibration images at the arch's resolution)
    calibration: Callable[[], Iterable[np.ndarray]] = lambda: ()

    def example(self) -> torch.Tensor:
        """One input image of the arch's resolution (zeros: the exporters trace shapes, not values)."""
        return torch.zeros(1, self.in_channels, self.arch.resolution, self.arch.resolution)


@dataclass(frozen=True)
class Format:
    """One way a subnet is served: its name (the API's enum value, lower case, without its prefix), the
    timing backends (runtimes) that run its files, its writer (deterministic bytes) and its reader."""

    name: str
    runtimes: tuple[str, ...]
    write: Callable[[Served], bytes]
    read: Callable[[bytes], Any]
    precision: str = "fp32"
    # an int8 row's quantizer (ONNX bytes, calibration batches -> bytes): also what a profile times with
    quantize: Callable[[bytes, Iterable[np.ndarray]], bytes] | None = None
    needs: str = ""  # the package its writer needs beyond the server's own (pip name = import name)


class OnnxModel:
    """ONNX bytes run by onnxruntime on the CPU, called as a module is: logits (a tensor) of a float batch."""

    def __init__(self, data: bytes) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().cpu().numpy()})[0])

    def eval(self) -> "OnnxModel":
        return self


class OpenVinoModel:
    """ONNX bytes compiled by OpenVINO for the CPU (as an OpenVINO device runs a served file), called as
    :class:`OnnxModel` is."""

    def __init__(self, data: bytes) -> None:
        import tempfile

        import openvino as ov

        with tempfile.TemporaryDirectory(prefix="ofa-ov-") as tmp:  # its ONNX reader takes a path
            path = Path(tmp) / "model.onnx"
            path.write_bytes(data)
            self.compiled = ov.Core().compile_model(str(path), "CPU")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled([x.detach().cpu().numpy()])[0].copy())

    def eval(self) -> "OpenVinoModel":
        return self


def _read_torchscript(data: bytes) -> nn.Module:
    return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def _onnx(s: Served) -> bytes:
    return export_onnx(s.module, s.example())


def _int8(quantize: Callable[[bytes, Iterable[np.ndarray]], bytes]) -> Callable[[Served], bytes]:
    return lambda s: quantize(_onnx(s), s.calibration())


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("safetensors", ("torch",), lambda s: write_safetensors(s.module, s.metadata), lambda b: read_subnet(b)[0]),
    Format("onnx", ("onnxruntime", "openvino"), _onnx, OnnxModel),
    Format("torchscript", ("torch",), lambda s: export_torchscript(s.module, s.metadata), _read_torchscript),
    Format("onnx_int8", ("onnxruntime",), _int8(quantize_onnx), OnnxModel, "int8", quantize_onnx),
    Format("openvino_int8", ("openvino",), _int8(quantize_nncf), OpenVinoModel, "int8", quantize_nncf, "nncf"),
)}
RECORDED = "safetensors"  # the format a fine-tuned subnet is recorded in: served as its file is, byte for byte


def format_of(name: str) -> Format:
    """The row of ``name``; a ValueError names the formats there are."""
    if name not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {str(name)[:40]!r}")
    return FORMATS[name]


def writable(name: str) -> Format:
    """The row of ``name`` (a format of :data:`FORMATS`); a ValueError where its writer's package is missing."""
    import importlib.util

    form = format_of(name)
    if form.needs and importlib.util.find_spec(form.needs) is None:
        raise ValueError(f"format {name} needs the {form.needs} package (pip install {form.needs})")
    return form


def run_format(runtime: str, precision: str = "fp32") -> str:
    """The format a served subnet is timed and run in by the timing backend ``runtime`` at ``precision`` (the
    first row of both)."""
    for f in FORMATS.values():
        if runtime in f.runtimes and f.precision == precision:
            return f.name
    known = sorted({(r, f.precision) for f in FORMATS.values() for r in f.runtimes})
    raise ValueError(f"no format runs in {runtime!r} at {precision!r}; (runtime, precision) pairs: {known}")


# ---- the function ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubnetFile:
    """A served subnet's bytes in one format, their sha256, how many images calibrated its BN, and whether
    it is the artifact's fine-tuned subnet of the arch (``ofa finetune``) rather than the extracted one."""

    data: bytes
    sha256: str
    calibration_images: int
    fine_tuned: bool = False


def subnet_file(art: Artifact, arch: Arch, fmt: str, images: torch.Tensor | None = None,
                should_stop: Callable[[], bool] | None = None) -> SubnetFile:
    """``arch`` of ``art`` as served, in ``fmt`` (a name of :data:`FORMATS`): the same request gives the same
    bytes in any process. Where the artifact records a fine-tuned subnet of ``arch``, that one (its file as
    recorded in :data:`RECORDED`, else that module written); else the extracted subnet, BN re-calibrated on
    ``images`` (default :func:`ofa.calibrate.served_images`; a server passes the ones it chose once).
    ``should_stop`` can end the re-calibration between batches (:class:`ofa.calibrate.CalibrationCancelled`)."""
    from .calibrate import calibration_batches, served_images, served_subnet

    form = format_of(fmt)
    tuned = art.files.finetuned().get(arch.id)
    images = served_images(art) if images is None else images
    calibration = lambda: (b.numpy() for b in calibration_batches(images, art.data, arch.resolution))  # noqa: E731
    with torch.inference_mode(False), torch.no_grad():
        if tuned is not None:
            data = art.files.read(tuned)  # checked against the manifest's sha256
            module, meta = read_subnet(data)
            if meta.get("id") != arch.id or meta.get("supernet_digest") != art.digest or "finetuned" not in meta:
                raise ArtifactError(f"{art.path}: {tuned} is not a fine-tuned subnet {arch.id} of this supernet")
            count = int(meta["calibration_images"])
            if fmt != RECORDED:
                data = form.write(Served(module, arch, canonical_json(meta), art.space.in_channels, calibration))
        else:
            module = served_subnet(art.supernet, arch, images, art.data, should_stop=should_stop)
            count = len(images)
            meta_json = subnet_metadata(arch, art.space, art.data.to_dict(), art.digest, count)
            data = form.write(Served(module, arch, meta_json, art.space.in_channels, calibration))
    return SubnetFile(data, hashlib.sha256(data).hexdigest(), count, tuned is not None)


def finetuned_archs(files: ArtifactFiles) -> dict[str, Arch]:
    """{subnet id: arch} of the fine-tuned subnets an artifact records (from their files' metadata): the
    subnets :func:`subnet_file` serves fine-tuned."""
    return {sid: Arch.from_dict(subnet_file_metadata(files.read(name))["arch"])
            for sid, name in files.finetuned().items()}


def export_parts(space: SearchSpace | None, exports: Iterable[Sequence[Any]], backend: str, precision: str,
                 report: Callable[[int], None] = lambda done: None) -> None:
    """Export each ``(part, shape, path, seed)`` of ``exports`` (a part as :meth:`ofa.predict.timing.Part.to_dict`
    gives it) to an ONNX file at ``path``, its weights and input seeded with ``seed``; at precision int8 quantized as
    ``backend``'s served int8 file is, calibrated on seeded noise. A file is whole or absent (written beside, then
    renamed): a folder of exports is used again. ``report(k)`` after the k-th. An export worker
    (:mod:`ofa_client._timer`) runs this, or :func:`ofa.predict.timing.time_parts` for a few networks."""
    quantize = FORMATS[run_format(backend, precision)].quantize
    with num_threads(1), torch.inference_mode(False):
        for k, (part, shape, path, seed) in enumerate(exports):
            with seeded(seed):
                module = module_of(space, part).eval()
                x = torch.randn(*shape)
                noise = [x.numpy()] + [torch.randn(*shape).numpy() for _ in range(3)]
            data = export_onnx(module, x, dynamic_batch=False)
            if quantize is not None:
                data = quantize(data, noise)
            os.replace(write_temp(Path(path), data), path)  # a temporary name of its own, renamed whole
            report(k + 1)
