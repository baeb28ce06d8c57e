"""Atomic file writes, digests and the artifact error, shared by checkpoints and artifacts (no torch)."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

__all__ = ["ArtifactError", "atomic_create_text", "atomic_save_tensors", "atomic_write_text", "sha256_file"]


class ArtifactError(ValueError):
    """A directory that is not a complete, intact artifact; the message says what is wrong."""


def _write_temp(path: Path, data: bytes, tag: str) -> Path:
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = _write_temp(path, text.encode() if isinstance(text, str) else text, str(os.getpid()))
    os.replace(tmp, path)


def atomic_create_text(path: Path, text: str) -> None:
    """Like :func:`atomic_write_text`, but FileExistsError if ``path`` exists (also against other processes)."""
    path = Path(path)
    tmp = _write_temp(path, text.encode(), f"{os.getpid()}.{threading.get_ident()}")
    try:
        os.link(tmp, path)  # atomic, and refuses an existing name
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors ``save_file`` through a temp file and ``os.replace``."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
