"""The supernet artifact: one directory that ``ofa serve`` reads and nothing in it is a pickle.

    manifest.json            format version, versions, sha256 of every file, training config, metrics
    space.json               the search space (SearchSpace.to_json)
    data.json                the data description (channels, size, classes, mean/std, class names)
    supernet.safetensors     the supernet weights
    calibration.safetensors  uint8 training images for BN re-calibration (the server needs no dataset;
                             an imported checkpoint may lack it until given a folder of images)

Later stages add files (accuracy predictor, latency tables, fine-tuned subnets), recorded the same way.
Every write is a commit that a kill at any moment cannot break (:func:`_commit`): the new
files are staged under temporary names, then ``manifest.pending.json`` (the new manifest and
the staged names) is written as the commit point, then the files are renamed into place and
the manifest replaced. The next load (or write) finds an interrupted commit and completes it,
or, killed before its commit point, removes what it had staged, and says so in a log line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from . import __version__
from ._io import ArtifactError, atomic_write_text, folder_lock, sha256_file, sync_dir, write_temp

if TYPE_CHECKING:  # torch is imported where weights are read or written: the scorer's readers need numpy only
    import torch

    from .data import DataSpec
    from .space import SearchSpace
    from .supernet import Supernet

__all__ = ["ACCURACY_PREDICTOR", "Artifact", "ArtifactError", "ArtifactFiles", "CALIBRATION", "CHECKPOINTS",
           "FINETUNED_DIR", "FORMAT_VERSION", "MANIFEST", "MEASUREMENTS", "METRICS_LOG", "PENDING",
           "SERVED_CALIBRATION", "add_file", "finetuned_file", "latency_file", "load_artifact", "open_artifact",
           "repair_artifact", "write_artifact"]

log = logging.getLogger("ofa")

# ---- the artifact's file names: this module is the one place that knows them ----------------------------
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PENDING = "manifest.pending.json"  # a commit under way: the new manifest and the files staged for it
SPACE, DATA, SUPERNET, CALIBRATION = "space.json", "data.json", "supernet.safetensors", "calibration.safetensors"
CORE_FILES = (CALIBRATION, DATA, SPACE, SUPERNET)
ACCURACY_PREDICTOR = "accuracy_predictor.safetensors"
MEASUREMENTS = "accuracy/measurements.json"
INT8_ACCURACY = "accuracy/int8.json"  # what int8 costs served subnets (ofa int8-accuracy); dropped with the weights
LATENCY_DIR = "latency/"
FINETUNED_DIR = "finetuned/"  # fine-tuned subnets (``ofa finetune``), served in place of the extracted ones
METRICS_LOG = "metrics.jsonl"  # training's per-epoch log, next to the artifact's files (not in the manifest)
CHECKPOINTS = "checkpoints"  # training's checkpoints (not in the manifest; their writer cleans its own temp files)
SERVED_CALIBRATION = "served_calibration_images"  # a manifest key (see ofa.calibrate.served_images)
# made from the weights: invalid after new ones
WEIGHT_DEPENDENT = (ACCURACY_PREDICTOR, MEASUREMENTS.rsplit("/", 1)[0] + "/", FINETUNED_DIR)


def latency_file(target: str) -> str:
    """The artifact file of ``target``'s latency table."""
    return f"{LATENCY_DIR}{target}.json"


def finetuned_file(arch_id: str) -> str:
    """The artifact file of the fine-tuned subnet ``arch_id`` (a served subnet safetensors file)."""
    return f"{FINETUNED_DIR}{arch_id}.safetensors"


class ArtifactFiles:
    """The files of one artifact as its manifest lists them, each checked against its sha256 once.

    :meth:`read` hashes the bytes it returns (a file read is verified as read, never twice);
    small files are kept, so the readers of one artifact (weights, scorer, server) share one
    verification. Made by :func:`open_artifact`.
    """

    KEEP_BYTES = 16 << 20  # files up to this size are kept once read (tables, predictor, measurements)

    def __init__(self, root: Path, manifest: dict[str, Any], verify: bool) -> None:
        self.root, self.manifest, self.verify = root, manifest, verify
        self._kept: dict[str, bytes] = {}

    @property
    def digest(self) -> str:
        """The artifact's identity: sha256 over the digests of its core files."""
        return self.manifest["digest"]

    @property
    def names(self) -> list[str]:
        return sorted(self.manifest["files"])

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def latency_targets(self) -> dict[str, str]:
        """{target: file name} of the latency tables the manifest lists."""
        return {n[len(LATENCY_DIR):-len(".json")]: n for n in self.names
                if n.startswith(LATENCY_DIR) and n.endswith(".json")}

    def finetuned(self) -> dict[str, str]:
        """{arch id: file name} of the fine-tuned subnets the manifest lists."""
        return {n[len(FINETUNED_DIR):-len(".safetensors")]: n for n in self.names
                if n.startswith(FINETUNED_DIR) and n.endswith(".safetensors")}

    def read(self, name: str) -> bytes:
        """The bytes of ``name``; with ``verify`` they must match the manifest's sha256."""
        if name in self._kept:
            return self._kept[name]
        if not self.has(name):
            raise ArtifactError(f"{self.root}: the manifest does not list {name}")
        try:
            data = (self.root / name).read_bytes()
        except OSError as e:
            raise ArtifactError(f"{self.root}: {name} cannot be read: {e.strerror}") from None
        if self.verify and hashlib.sha256(data).hexdigest() != self.manifest["files"][name]:
            raise ArtifactError(f"{self.root}: {name} does not match its sha256 in the manifest")
        if len(data) <= self.KEEP_BYTES:
            self._kept[name] = data
        return data

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as e:
            raise ArtifactError(f"{self.root}: {name} is not valid JSON: {e}") from None

    def verified_path(self, name: str) -> Path:
        """The path of ``name`` after its sha256 was checked (streamed: for large files, read by path after)."""
        if not self.has(name):
            raise ArtifactError(f"{self.root}: the manifest does not list {name}")
        if self.verify and name not in self._kept and sha256_file(self.root / name) != self.manifest["files"][name]:
            raise ArtifactError(f"{self.root}: {name} does not match its sha256 in the manifest")
        return self.root / name

    def read_small(self) -> None:
        """Read (and check) every listed file up to :attr:`KEEP_BYTES` now: they are kept."""
        for name in self.names:
            if name not in self._kept and (self.root / name).stat().st_size <= self.KEEP_BYTES:
                self.read(name)

    def verify_all(self, done: Iterable[str] = ()) -> None:
        """Check every listed file not checked yet (``done``: checked already); small ones are kept."""
        self.read_small()
        for name in sorted(set(self.names) - set(self._kept) - set(done)):
            self.verified_path(name)

    def space(self) -> "SearchSpace":
        from .space import SearchSpace

        try:
            return SearchSpace.from_dict(self.read_json(SPACE))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{self.root}: {SPACE} is not a search-space definition: {e}") from None


def open_artifact(path: str | Path, verify: bool = True) -> ArtifactFiles:
    """The files of the artifact at ``path``: the manifest checked (format version, entries inside the
    folder, files present, identity) and every file up to ``ArtifactFiles.KEEP_BYTES`` read (and, with
    ``verify``, hashed) under the shared lock, so what is read later belongs to the same commit; the
    weights are read by :func:`load_artifact`. An interrupted write is repaired first (:func:`repair_artifact`)."""
    path = Path(path)
    repair_artifact(path)
    with folder_lock(path, exclusive=False):  # not halfway through another process's commit
        files = ArtifactFiles(path, _checked_manifest(path, verify), verify)
        files.read_small()
    return files


def _checked_manifest(path: Path, verify: bool) -> dict[str, Any]:
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
    missing = [n for n in CORE_FILES if n not in files and n != CALIBRATION]  # (see write_artifact)
    if missing:
        raise ArtifactError(f"{path}: the manifest does not list {missing}")
    root = path.resolve()
    for name in files:
        file = (path / name).resolve()
        if root not in file.parents:
            raise ArtifactError(f"{path}: manifest entry {name!r} points outside the artifact")
        if not file.is_file():
            raise ArtifactError(f"{path}: {name} is listed in the manifest but missing")
    if verify and manifest.get("digest") != _identity(files):
        raise ArtifactError(f"{path}: the manifest's digest does not match its files")
    return manifest


@dataclass
class Artifact:
    """A loaded artifact: the supernet built, space, data, calibration images (None: an import given none)."""

    path: Path
    manifest: dict[str, Any]
    space: SearchSpace
    data: DataSpec
    supernet: Supernet
    calibration: torch.Tensor | None
    files: ArtifactFiles

    @property
    def digest(self) -> str:  # the artifact's identity: sha256 over the digests of its core files
        return self.manifest["digest"]


def _identity(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps({n: digests[n] for n in CORE_FILES if n in digests},
                                     sort_keys=True).encode()).hexdigest()


def _temp_files(folder: Path) -> list[Path]:
    """Temporary files of interrupted writes in the artifact's own folders (not ``checkpoints/``, whose
    writer cleans its own)."""
    dirs = [folder] + [d for d in folder.iterdir() if d.is_dir() and d.name != CHECKPOINTS]
    return [f for d in dirs for f in d.glob(".*.tmp") if f.is_file()]


def _roll_forward(folder: Path, pending: dict[str, Any]) -> None:
    for name, temp in pending["staged"].items():
        staged = (folder / name).parent / temp
        if staged.exists():  # not renamed yet
            os.replace(staged, folder / name)
        elif not (folder / name).is_file() or sha256_file(folder / name) != pending["manifest"]["files"][name]:
            raise ArtifactError(f"{folder}: {name} of an interrupted write is neither staged nor in place")
    for d in {(folder / name).parent for name in pending["staged"]}:
        sync_dir(d)
    atomic_write_text(folder / MANIFEST, json.dumps(pending["manifest"], indent=1, sort_keys=True))
    (folder / PENDING).unlink()
    sync_dir(folder)


def _repair(folder: Path) -> list[str]:
    """Complete a commit that was interrupted after its commit point, remove the temporary files of one that
    was not; under the exclusive lock. Returns what was done, for a log line."""
    done = []
    if (folder / PENDING).exists():
        try:
            pending = json.loads((folder / PENDING).read_text())
            _roll_forward(folder, pending)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{folder}: an interrupted write ({PENDING}) cannot be completed: {e}") from None
        done.append(f"completed an interrupted write of {sorted(pending['staged'])}")
    leftovers = _temp_files(folder)
    for f in leftovers:
        f.unlink(missing_ok=True)
    if leftovers:
        done.append(f"removed {len(leftovers)} temporary files of an interrupted write "
                    f"({', '.join(sorted(f.name for f in leftovers)[:5])})")
    return done


def repair_artifact(folder: str | Path) -> list[str]:
    """Bring an artifact left by a killed ``ofa train``/``predictors``/``profile`` back to a loadable state:
    the interrupted write is completed or undone. Returns what was done (also logged); [] when intact."""
    folder = Path(folder)
    if not folder.is_dir() or (not (folder / PENDING).exists() and not _temp_files(folder)):
        return []
    with folder_lock(folder, exclusive=True):
        try:
            done = _repair(folder)
        except OSError as e:  # a read-only copy: say what is needed
            raise ArtifactError(f"{folder}: an interrupted write needs repair, which needs write access to the "
                                f"folder ({e.strerror}); open it once where it can be written") from None
    for line in done:
        log.warning("artifact %s: %s", folder, line)
    return done


def _commit(folder: Path, files: dict[str, bytes], update) -> dict[str, Any]:
    """Write ``files`` (name -> bytes) and the manifest ``update(old manifest or None, new digests)`` returns,
    so that any kill leaves the old artifact or the new one (after :func:`repair_artifact`)."""
    with folder_lock(folder, exclusive=True):
        for line in _repair(folder):
            log.warning("artifact %s: %s", folder, line)
        old = None
        if (folder / MANIFEST).exists():
            try:
                old = json.loads((folder / MANIFEST).read_text())
            except ValueError:
                old = None
        staged = {}
        try:
            for name, data in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                staged[name] = write_temp(folder / name, data).name
            manifest = update(old, {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
            pending = {"manifest": manifest, "staged": staged}
            atomic_write_text(folder / PENDING, json.dumps(pending, sort_keys=True))  # the commit point
        except BaseException:
            for name, temp in staged.items():
                ((folder / name).parent / temp).unlink(missing_ok=True)
            raise
        _roll_forward(folder, pending)
    return manifest


def write_artifact(out: Path, supernet: Supernet, data: DataSpec, calibration: torch.Tensor | None,
                   config: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write (or overwrite) the artifact files in ``out`` and a manifest naming their digests (without
    ``calibration``, the artifact has no calibration set: it can be profiled, not served)."""
    import torch
    from safetensors.torch import save

    from .supernet import supernet_bytes
    out.mkdir(parents=True, exist_ok=True)
    space = supernet.space
    files = {
        SPACE: space.to_json().encode(),
        DATA: json.dumps(data.to_dict(), sort_keys=True).encode(),
        SUPERNET: supernet_bytes(supernet),
    }
    if calibration is not None:
        files[CALIBRATION] = save({"images": calibration.to(torch.uint8).contiguous()})

    def update(old: dict[str, Any] | None, digests: dict[str, str]) -> dict[str, Any]:
        old = old or {}
        # The identity covers what decides the served weights; tables added later do not change it.
        identity = _identity(digests)
        # Latency tables depend on the space only and stay; the accuracy predictor, its measurements
        # and the fine-tuned subnets describe the old weights, so new weights drop them from the manifest.
        kept = {n: d for n, d in (old.get("files") or {}).items() if n not in CORE_FILES and (out / n).exists()}
        if old.get("digest") != identity:
            kept = {n: d for n, d in kept.items() if not n.startswith(WEIGHT_DEPENDENT)}
        return {**({k: old[k] for k in (SERVED_CALIBRATION,) if k in old and old.get("digest") == identity}),
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ofa_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "space": space.name,
            "dataset": data.name,
            "files": {**kept, **digests},
            "digest": identity,
            "training": config,
            "metrics": metrics,
        }

    _commit(out, files, update)
    return out


def add_file(artifact_dir: Path, name: str, text: str | bytes, manifest: dict[str, Any] | None = None) -> Path:
    """Write ``name`` (e.g. ``latency/laptop.json``) into an artifact, record its sha256 (and ``manifest``'s keys)."""
    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / MANIFEST).exists() and not (artifact_dir / PENDING).exists():
        raise ArtifactError(f"{artifact_dir} is not an artifact: {MANIFEST} is missing")

    def update(old: dict[str, Any] | None, digests: dict[str, str]) -> dict[str, Any]:
        if old is None:
            raise ArtifactError(f"{artifact_dir} is not an artifact: {MANIFEST} is missing or invalid")
        return {**old, **(manifest or {}), "files": {**old["files"], **digests}}

    _commit(artifact_dir, {name: text.encode() if isinstance(text, str) else text}, update)
    return artifact_dir / name


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read an artifact and build its supernet; with ``verify`` every file's sha256 must match the manifest
    (each file hashed once: the small ones stay in ``Artifact.files`` for the scorer). An interrupted write
    is repaired first (:func:`repair_artifact`)."""
    path = Path(path)
    repair_artifact(path)
    with folder_lock(path, exclusive=False):  # not halfway through another process's commit
        files = ArtifactFiles(path, _checked_manifest(path, verify), verify)
        art = _load(files)
        files.verify_all(done=(SUPERNET, CALIBRATION))
    return art


def _load(files: ArtifactFiles) -> Artifact:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .data import DataSpec
    from .supernet import Supernet

    try:
        space = files.space()
        data = DataSpec.from_dict(files.read_json(DATA))
        supernet = Supernet(space)
        supernet.load_state_dict(load_file(str(files.verified_path(SUPERNET))))
        calibration = load_file(str(files.verified_path(CALIBRATION)))["images"] if files.has(CALIBRATION) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{files.root}: {e}") from None
    return Artifact(files.root, files.manifest, space, data, supernet.eval(), calibration, files)
