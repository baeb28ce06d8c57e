"""The supernet artifact: one directory that ``ofa serve`` reads and nothing in it is a pickle.

    manifest.json            format version, versions, sha256 of every file, training config, metrics
    space.json               the search space (SearchSpace.to_json)
    data.json                the data description (channels, size, classes, mean/std, class names)
    supernet.safetensors     the supernet weights
    calibration.safetensors  uint8 training images for BN re-calibration (the server needs no dataset)

Later stages add files (the accuracy predictor, latency tables) and record them in
the manifest the same way.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from .data import DataSpec
from .space import SearchSpace
from .supernet import Supernet
from ._io import ArtifactError, atomic_save_tensors, atomic_write_text, sha256_file
from .predict.measure import MEASUREMENTS
from .search.load import ACCURACY_PREDICTOR

__all__ = ["Artifact", "ArtifactError", "FORMAT_VERSION", "add_file", "load_artifact", "write_artifact"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CORE_FILES = ("calibration.safetensors", "data.json", "space.json", "supernet.safetensors")
# made from the weights: invalid after new ones
WEIGHT_DEPENDENT = (ACCURACY_PREDICTOR, MEASUREMENTS.rsplit("/", 1)[0] + "/")


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    space: SearchSpace
    data: DataSpec
    supernet: Supernet
    calibration: torch.Tensor

    @property
    def digest(self) -> str:
        """The artifact's identity: sha256 over the digests of its files."""
        return self.manifest["digest"]


def _identity(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps({n: digests[n] for n in CORE_FILES}, sort_keys=True).encode()).hexdigest()


def write_artifact(out: Path, supernet: Supernet, data: DataSpec, calibration: torch.Tensor,
                   config: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write (or overwrite) the artifact files in ``out`` and a manifest naming their digests."""
    out.mkdir(parents=True, exist_ok=True)
    space = supernet.space
    old: dict[str, Any] = {}
    if (out / MANIFEST).exists():  # tables profiled earlier stay listed
        try:
            old = json.loads((out / MANIFEST).read_text())
        except ValueError:
            old = {}
    files = {
        "space.json": space.to_json(),
        "data.json": json.dumps(data.to_dict(), sort_keys=True),
    }
    for name, text in files.items():
        atomic_write_text(out / name, text)
    state = {k: v.detach().cpu().contiguous() for k, v in supernet.state_dict().items()}
    atomic_save_tensors(state, out / "supernet.safetensors", metadata={"space": space.name})
    atomic_save_tensors({"images": calibration.to(torch.uint8)}, out / "calibration.safetensors")
    digests = {n: sha256_file(out / n) for n in CORE_FILES}
    # The identity covers what decides the served weights; tables added later do not change it.
    identity = _identity(digests)
    # Latency tables depend on the space only and stay; the accuracy predictor and its
    # measurements describe the old weights, so new weights drop them from the manifest.
    kept = {n: d for n, d in (old.get("files") or {}).items() if n not in CORE_FILES and (out / n).exists()}
    if old.get("digest") != identity:
        kept = {n: d for n, d in kept.items() if not n.startswith(WEIGHT_DEPENDENT)}
    digests.update(kept)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ofa_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "space": space.name,
        "dataset": data.name,
        "files": digests,
        "digest": identity,
        "training": config,
        "metrics": metrics,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return out


def add_file(artifact_dir: Path, name: str, text: str | bytes) -> Path:
    """Write ``name`` (e.g. ``latency/laptop.json``) into an artifact and record its sha256."""
    artifact_dir = Path(artifact_dir)
    manifest_path = artifact_dir / MANIFEST
    if not manifest_path.exists():
        raise ArtifactError(f"{artifact_dir} is not an artifact: {MANIFEST} is missing")
    path = artifact_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = sha256_file(path)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return path


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read an artifact; with ``verify`` every file's sha256 must match the manifest."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise ArtifactError(f"{path} is not an artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError as e:
        raise ArtifactError(f"{path / MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path / MANIFEST} must be an object with a 'files' object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                            f"supported (this build reads {FORMAT_VERSION})")
    files = manifest["files"]
    missing = [n for n in CORE_FILES if n not in files]
    if missing:
        raise ArtifactError(f"{path}: the manifest does not list {missing}")
    root = path.resolve()
    for name, digest in files.items():
        file = (path / name).resolve()
        if root not in file.parents:
            raise ArtifactError(f"{path}: manifest entry {name!r} points outside the artifact")
        if not file.is_file():
            raise ArtifactError(f"{path}: {name} is listed in the manifest but missing")
        if verify and sha256_file(file) != digest:
            raise ArtifactError(f"{path}: {name} does not match its sha256 in the manifest")
    if verify and manifest.get("digest") != _identity(files):
        raise ArtifactError(f"{path}: the manifest's digest does not match its files")
    try:
        space = SearchSpace.from_dict(json.loads((path / "space.json").read_text()))
        data = DataSpec.from_dict(json.loads((path / "data.json").read_text()))
        supernet = Supernet(space)
        supernet.load_state_dict(load_file(str(path / "supernet.safetensors")))
        calibration = load_file(str(path / "calibration.safetensors"))["images"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as e:
        raise ArtifactError(f"{path}: {e}") from None
    return Artifact(path, manifest, space, data, supernet.eval(), calibration)
