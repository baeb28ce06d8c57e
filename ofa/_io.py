"""Atomic file writes, digests and the artifact error, shared by checkpoints and artifacts (no torch)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["ArtifactError", "atomic_create_text", "atomic_save_tensors", "atomic_write_text", "sha256_file",
           "folder_lock", "sync_dir", "write_temp"]


class ArtifactError(ValueError):
    """A directory that is not a complete, intact artifact; the message says what is wrong."""


def write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file next to ``path``: an unpredictable name created exclusively (so never
    through a planted symlink, nor shared by two processes with the same pid in two containers), fsynced;
    removed again if writing fails (a full or read-only disk)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def sync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem can sync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = write_temp(path, text.encode() if isinstance(text, str) else text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def atomic_create_text(path: Path, text: str) -> None:
    """Like :func:`atomic_write_text`, but FileExistsError if ``path`` exists (also against other processes)."""
    path = Path(path)
    tmp = write_temp(path, text.encode())
    try:
        os.link(tmp, path)  # atomic, and refuses an existing name
    finally:
        tmp.unlink(missing_ok=True)
    sync_dir(path.parent)


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The tensors as safetensors bytes, written by :func:`atomic_write_text`."""
    from safetensors.torch import save

    path = Path(path)
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_text(path, data)


@contextlib.contextmanager
def folder_lock(folder: Path, exclusive: bool):
    """An flock on ``folder/.lock``: exclusive to change the folder's files (an artifact's commit or repair),
    shared to read them. A folder where the lock file cannot be made (read-only) has no writers, and is read
    without one."""
    path = Path(folder) / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:
        try:  # another user's lock file: flock works on a read-only descriptor too
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            if exclusive and os.access(folder, os.W_OK):
                raise
            yield  # no lock file and none can be made: a read-only folder, which no one writes
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
