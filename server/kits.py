"""Profiling kits a server hands out (``GetProfileKit``): one tar per (supernet, format), built once.

A kit (:func:`ofa.jobs.profile.write_kit`) is what a device times to become a target with only the
light client. Building one exports a few hundred networks (tens of seconds; int8 ones are quantized
too), so the first request builds it while holding a build slot and later ones stream the tar from a
folder of the server's own, removed when the server stops. The tar is deterministic (sorted names,
no times or owners): the same supernet and format give the same bytes. An fp32 kit is one for every ONNX
runtime; an int8 kit is quantized as its runtime's served int8 file is (``onnx_int8``, ``openvino_int8``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from ofa.artifact import Artifact
from ofa.export import FORMATS
from ofa.jobs.profile import KIT_MANIFEST, write_kit

from .slots import take

__all__ = ["Kit", "Kits"]


@dataclass(frozen=True)
class Kit:
    """A built kit: its tar on disk, its manifest (kit.json's text), size and sha256."""

    path: Path
    manifest_json: str
    total_bytes: int
    sha256: str

    def chunks(self, size: int) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while block := f.read(size):
                yield block


def _tar(folder: Path, out: Path) -> None:
    """``folder`` as a deterministic tar at ``out``: sorted names, no times, owners or modes of this machine."""
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(str(path.relative_to(folder)))
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as f:
                tar.addfile(info, f)


class Kits:
    """The kits built so far, by (artifact digest, served format: :func:`ofa.export.run_format` of the kit's
    runtime and precision); each built once, by one request."""

    def __init__(self) -> None:
        self.folder: Path | None = None  # made by the first build: a server nobody asks for a kit writes nothing
        self._kits: dict[tuple[str, str], Kit] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def kit(self, artifact: Artifact, fmt: str, slot: Callable[[], ContextManager],
            gone: Callable[[], bool] = lambda: False) -> Kit:
        """The kit of ``artifact``'s space standing for format ``fmt`` (its networks quantized as an int8 format's
        served file is), built now (holding ``slot``) when not yet; a caller ``gone()`` stops waiting for another
        request's build of it (:class:`~ofa_server.slots.CallGone`)."""
        key = (artifact.digest, fmt)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with take(lock, gone):
            if key not in self._kits:
                with slot():
                    self._kits[key] = self._build(artifact, fmt)
            return self._kits[key]

    def _build(self, artifact: Artifact, fmt: str) -> Kit:
        with self._lock:
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="ofa-kits-"))
        name = f"{artifact.digest[:16]}-{fmt}"
        work = self.folder / name
        shutil.rmtree(work, ignore_errors=True)
        row = FORMATS[fmt]
        tar = self.folder / f"{name}.tar"
        try:
            write_kit(artifact.space, work, precision=row.precision, runtime=row.runtimes[0], progress=False)
            _tar(work, tar)
        except BaseException:  # a full disk, a cancelled call: nothing half-built stays on disk
            shutil.rmtree(work, ignore_errors=True)
            tar.unlink(missing_ok=True)
            raise
        manifest = (work / KIT_MANIFEST).read_text()
        shutil.rmtree(work)
        digest = hashlib.sha256()
        with open(tar, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return Kit(tar, json.dumps(json.loads(manifest), sort_keys=True), tar.stat().st_size, digest.hexdigest())

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

