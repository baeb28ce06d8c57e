"""The server's weights: a byte-bounded cache around :func:`ofa.export.subnet_file`, and the build slots.

Every served file is a pure function of (artifact, arch, format) (:mod:`ofa.export`: the calibration
images are the artifact's, in their stored order, and each writer is deterministic), so a cached file
is the file any replica would build, and the cache key is (artifact digest, arch id, format).
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Callable, ContextManager

import torch

from ofa.artifact import Artifact
from ofa.export import SubnetFile, subnet_file
from ofa.space import Arch

from .slots import take

__all__ = ["ServedWeights", "WeightsCache"]


class ServedWeights:
    """The files a server streams: from the cache, else built by :func:`ofa.export.subnet_file` while the
    caller holds a build slot (``slot``: a context manager that refuses when none is free)."""

    def __init__(self, max_bytes: int) -> None:
        self.cache = WeightsCache(max_bytes)

    def file(self, artifact: Artifact, arch: Arch, fmt: str, searched: bool, images: torch.Tensor,
             should_stop: Callable[[], bool], slot: Callable[[], ContextManager] = contextlib.nullcontext
             ) -> SubnetFile:
        """``arch`` of ``artifact`` in ``fmt``. ``searched``: a search of this server returned the arch (else
        any arch a client made up: cached apart, see :class:`WeightsCache`); ``images``: the calibration
        images the server chose once; ``should_stop``: the caller went away (ends a BN re-calibration)."""
        key = (artifact.digest, arch.id, fmt)
        found = self.cache.get(key, searched)
        if found is not None:
            return found
        with slot():
            return self.cache.get_or_build(
                key, lambda: subnet_file(artifact, arch, fmt, images, should_stop=should_stop), searched, should_stop)


class WeightsCache:
    """Built payloads keyed by (artifact digest, arch id, format), least recently used out, bounded in bytes.

    Concurrent requests for the same key build it once; the others wait for it. Files of archs
    no search has returned ("strangers": any valid arch may be asked for) share at most
    ``1/STRANGER_SHARE`` of the bytes and evict each other (searched ones only for that share),
    so a client asking for many arbitrary archs cannot push out the subnets that searches serve.
    """

    STRANGER_SHARE = 8

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: "OrderedDict[tuple[str, str, str], SubnetFile]" = OrderedDict()
        self._strangers: "OrderedDict[tuple[str, str, str], None]" = OrderedDict()
        self._bytes = self._stranger_bytes = 0
        self._lock = threading.Lock()
        self._building: dict[tuple[str, str, str], threading.Lock] = {}
        self.hits = self.misses = 0

    def get(self, key: tuple[str, str, str], searched: bool = True) -> SubnetFile | None:
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

    def _store(self, key, item: SubnetFile, searched: bool) -> None:
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

    def get_or_build(self, key: tuple[str, str, str], build, searched: bool = True,
                     gone: Callable[[], bool] = lambda: False) -> SubnetFile:
        """The cached item of ``key``, else ``build()`` stored; a request that finds another building it waits,
        unless its call has ended (``gone()``: :class:`~ofa_server.slots.CallGone`)."""
        item = self.get(key, searched)
        if item is not None:
            return item
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        with take(lock, gone):
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
        """Files being built now."""
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
