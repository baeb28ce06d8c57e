"""Ready-to-run weights of one subnet: extract, BN re-calibration, serialisation, and a byte-bounded cache.

Every format is a pure function of (artifact, arch, format): the calibration images are
the artifact's, in their stored order, and each writer is deterministic (checked by
the tests), so the same request gives byte-identical bytes in any process.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ofa.artifact import Artifact, ArtifactError
from ofa.calibrate import served_images, served_subnet
from ofa.formats import FORMATS, export_onnx, export_torchscript, read_subnet, subnet_metadata, write_safetensors
from ofa.space import Arch

__all__ = ["FORMATS", "Payload", "WeightsCache", "build_payload"]


@dataclass(frozen=True)
class Payload:
    data: bytes
    sha256: str
    calibration_images: int
    fine_tuned: bool = False  # the artifact's fine-tuned subnet of the arch (``ofa finetune``), not the extracted one


def build_payload(art: Artifact, arch: Arch, fmt: str, should_stop=None, images: torch.Tensor | None = None
                  ) -> Payload:
    """The bytes of ``arch`` in ``fmt`` (one of :data:`FORMATS`): the served subnet of
    :func:`ofa.calibrate.served_subnet`, calibrated on ``images`` (default :func:`ofa.calibrate.served_images`;
    a server passes the ones it chose once); ``should_stop`` can end the BN re-calibration between
    batches (:class:`ofa.calibrate.CalibrationCancelled`). Where the artifact records a fine-tuned subnet
    of ``arch`` (``ofa finetune``), that one is served instead (``Payload.fine_tuned``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    tuned = art.files.finetuned().get(arch.id)
    if tuned is not None:
        with torch.inference_mode(False), torch.no_grad():
            return _fine_tuned(art, arch, fmt, tuned)
    images = served_images(art) if images is None else images
    with torch.inference_mode(False), torch.no_grad():
        sub = served_subnet(art.supernet, arch, images, art.data, should_stop=should_stop)
        meta = subnet_metadata(arch, art.space, art.data.to_dict(), art.digest, len(images))
        if fmt == "safetensors":
            data = write_safetensors(sub, meta)
        elif fmt == "torchscript":
            data = export_torchscript(sub, meta)
        else:
            data = export_onnx(sub, torch.zeros(1, art.space.in_channels, arch.resolution, arch.resolution))
    return Payload(data, hashlib.sha256(data).hexdigest(), len(images))


def _fine_tuned(art: Artifact, arch: Arch, fmt: str, name: str) -> Payload:
    """The fine-tuned subnet ``name`` the artifact records for ``arch``: its file as it is (safetensors, the
    served format with ``finetuned`` in its metadata), or that module exported; refused when the file is
    not of this arch and these weights."""
    data = art.files.read(name)  # checked against the manifest's sha256
    module, meta = read_subnet(data)
    if meta.get("id") != arch.id or meta.get("supernet_digest") != art.digest or "finetuned" not in meta:
        raise ArtifactError(f"{art.path}: {name} is not a fine-tuned subnet {arch.id} of this supernet")
    if fmt == "torchscript":
        data = export_torchscript(module, json.dumps(meta, sort_keys=True, separators=(",", ":")))
    elif fmt == "onnx":
        data = export_onnx(module, torch.zeros(1, art.space.in_channels, arch.resolution, arch.resolution))
    return Payload(data, hashlib.sha256(data).hexdigest(), int(meta["calibration_images"]), True)


class WeightsCache:
    """Built payloads keyed by (artifact digest, arch id, format), least recently used out, bounded in bytes.

    Concurrent requests for the same key build it once; the others wait for it. Payloads of archs
    no search has returned ("strangers": any valid arch may be asked for) share at most
    ``1/STRANGER_SHARE`` of the bytes and evict each other (searched ones only for that share),
    so a client asking for many arbitrary archs cannot push out the subnets that searches serve.
    """

    STRANGER_SHARE = 8

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: "OrderedDict[tuple[str, str, str], Payload]" = OrderedDict()
        self._strangers: "OrderedDict[tuple[str, str, str], None]" = OrderedDict()
        self._bytes = self._stranger_bytes = 0
        self._lock = threading.Lock()
        self._building: dict[tuple[str, str, str], threading.Lock] = {}
        self.hits = self.misses = 0

    def get(self, key: tuple[str, str, str], searched: bool = True) -> Payload | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
                if key in self._strangers:
                    if searched:  # a search has returned it since
                        del self._strangers[key]
                        self._stranger_bytes -= len(item.data)
                    else:
                        self._strangers.move_to_end(key)
            return item

    def _drop(self, key) -> None:
        old = self._items.pop(key)
        self._bytes -= len(old.data)
        if self._strangers.pop(key, False) is None:
            self._stranger_bytes -= len(old.data)

    def _store(self, key, item: Payload, searched: bool) -> None:
        size = len(item.data)
        if size > (self.max_bytes if searched else self.max_bytes // self.STRANGER_SHARE):
            return
        self._items[key] = item
        self._bytes += size
        if not searched:
            self._strangers[key] = None
            self._stranger_bytes += size
            while self._stranger_bytes > self.max_bytes // self.STRANGER_SHARE:
                self._drop(next(iter(self._strangers)))
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def get_or_build(self, key: tuple[str, str, str], build, searched: bool = True) -> Payload:
        item = self.get(key, searched)
        if item is not None:
            return item
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            item = self.get(key, searched)
            if item is not None:
                return item
            try:
                item = build()
            except BaseException:  # failed or cancelled: the next request builds anew
                with self._lock:
                    self._building.pop(key, None)
                raise
            with self._lock:  # stored and unlocked at once, so no request in between builds it again
                self.misses += 1
                self._building.pop(key, None)
                self._store(key, item, searched)
            return item

    @property
    def bytes(self) -> int:
        return self._bytes

    # ---- read-only views (for health pages and tests) ----
    @property
    def building_count(self) -> int:
        """Payloads being built now."""
        with self._lock:
            return len(self._building)

    @property
    def stranger_bytes(self) -> int:
        """Bytes held by payloads of archs no search has returned."""
        return self._stranger_bytes

    def keys(self) -> list[tuple[str, str, str]]:
        """The keys of the payloads held, least recently used first."""
        with self._lock:
            return list(self._items)
