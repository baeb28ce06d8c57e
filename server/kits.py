"""Profiling kits a server hands out (``GetProfileKit``): one tar per (supernet, format), built once.

A kit (:func:`ofa.jobs.profile.write_kit`) is what a device times to become a target with only the
light client. Building one exports a few hundred networks (tens of seconds; int8 ones are quantized
too), so the first request builds it while holding a build slot and later ones stream the tar from a
folder of the server's own, removed when the server stops: a build still running once the drain's grace is
over is stopped (its export workers killed) first. A lock file in the folder is flocked while its server
lives; the first build of a server removes the folders of servers that died without removing theirs (a
``kill -9``, a power cut). The tar is deterministic (sorted names, no times or owners): the same supernet
and format give the same bytes. An fp32 kit is one for every ONNX runtime; an int8 kit is quantized as its
runtime's served int8 file is (``onnx_int8``, ``openvino_int8``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from ofa.artifact import Artifact
from ofa.export import FORMATS
from ofa.jobs.profile import KIT_MANIFEST, write_kit
from ofa_client.timing import TimingError

from .slots import take

__all__ = ["Closing", "Kit", "Kits"]

PREFIX = "ofa-kits-"  # a server's kit folder in the temporary directory: ofa-kits-XXXXXXXX
LOCK = ".in-use"      # the file in it that its server holds a flock on
STALE_AFTER_S = 60.0  # a folder younger than this may be one another server is just making: never swept


class Closing(RuntimeError):
    """The server is stopping: the kit's build was stopped. Another server, or this one once back, builds it."""


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

    def __init__(self, temp: str | None = None) -> None:
        self.temp = Path(temp or tempfile.gettempdir())
        self.folder: Path | None = None  # made by the first build: a server nobody asks for a kit writes nothing
        self._held: int | None = None  # the descriptor of the folder's lock file, open while the server lives
        self._kits: dict[tuple[str, str], Kit] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a build ends
        self._building = 0
        self._closing = threading.Event()

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
        if self.folder is None:  # outside the lock: removing a dead server's folder holds up no lookup
            sweep(self.temp)
        with self._lock:
            if self._closing.is_set():
                raise Closing("the server is stopping: no kit is built now; retry later or on another server")
            if self.folder is None:
                self.folder, self._held = _own_folder(self.temp)
            self._building += 1
        try:
            return self._built(artifact, fmt)
        except TimingError as e:
            if self._closing.is_set():
                raise Closing("the server is stopping: the kit's build was stopped; retry later or on another "
                              "server") from e
            raise
        finally:
            with self._idle:
                self._building -= 1
                self._idle.notify_all()

    def _built(self, artifact: Artifact, fmt: str) -> Kit:
        assert self.folder is not None
        name = f"{artifact.digest[:16]}-{fmt}"
        work = self.folder / name
        shutil.rmtree(work, ignore_errors=True)
        row = FORMATS[fmt]
        tar = self.folder / f"{name}.tar"
        try:
            write_kit(artifact.space, work, precision=row.precision, runtime=row.runtimes[0], progress=False,
                      stop=self._closing.is_set)
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

    def close(self, wait: float = 30.0) -> None:
        """Stop the builds still running (their export workers are killed within a second), wait up to ``wait``
        seconds for them to end, then remove the folder. Called once, as the server stops."""
        self._closing.set()
        with self._idle:
            self._idle.wait_for(lambda: self._building == 0, timeout=wait)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._held is not None:
            os.close(self._held)
            self._held = None


def _own_folder(temp: Path) -> tuple[Path, int]:
    """A new kit folder in ``temp`` and the descriptor of its lock file, flocked until it is closed (or the
    process ends); no folder is left without its lock."""
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=temp))
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    fcntl.flock(fd, fcntl.LOCK_EX)  # its own new file: nobody else holds it
    return folder, fd


def sweep(temp: Path) -> list[Path]:
    """Remove the kit folders in ``temp`` whose server is gone, and return them: a real folder of this user's,
    older than :data:`STALE_AFTER_S`, whose lock file nobody holds. A folder without a lock file (an older
    version's server, or one being made) and anything another user owns or a link points to are left alone."""
    gone = []
    for folder in temp.glob(PREFIX + "*"):
        try:
            st = os.lstat(folder)
            if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
                    or time.time() - st.st_mtime < STALE_AFTER_S):
                continue
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # no lock file, a link, or removed meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its server holds it: alive
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
        finally:
            os.close(fd)
    return gone
