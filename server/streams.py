"""The weight streams being sent: their slots, a watchdog for clients that stop reading, and preemption.

A client that reads nothing keeps its stream's handler thread waiting on flow control. At most
``--max-streams`` such threads exist (on top of the other RPCs'); a stream whose client took no
message for ``--stream-stall-s`` is cancelled by the watchdog, and when every slot is taken, the
stream stalled longest (for ``--stream-preempt-s`` or more) makes way for a new one.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import grpc

from .slots import Slots

__all__ = ["Stream", "Streams"]

log = logging.getLogger("ofa_server")


@dataclass
class Stream:
    """One weight stream: its call, when its client last took a message (None while the file is built: a
    build is bounded on its own), and whether it was cancelled to make way for another."""

    context: grpc.ServicerContext
    client: str
    progress: float | None = None
    cancelled: bool = False


class Streams:
    """The stream slots (server-wide and per client) and the streams holding them."""

    def __init__(self, slots: Slots, stall_s: float, preempt_s: float) -> None:
        self.slots, self.stall_s, self.preempt_s = slots, stall_s, preempt_s
        self._lock = threading.Lock()
        self._sending: dict[int, Stream] = {}
        self._closed = threading.Event()
        threading.Thread(target=self._watch, name="ofa-stream-watch", daemon=True).start()

    @property
    def open_count(self) -> int:
        """Weight streams being sent now."""
        return self.slots.held

    def open(self, context: grpc.ServicerContext, client: str) -> Stream | str:
        """A slot for a new stream of ``client``: the stream, or why there is none (for RESOURCE_EXHAUSTED)."""
        why = self.slots.acquire(client)
        if why and not self.slots.at_peer_limit(client) and self._preempt():
            why = self.slots.acquire(client, wait=2.0)  # the cancelled stream's thread gives its slot back
        if why:
            return why
        stream = Stream(context, client)
        with self._lock:
            self._sending[id(stream)] = stream
        return stream

    def send(self, stream: Stream, messages: Iterable) -> Iterator:
        """``messages``, each yielded once the client took the one before (that is progress)."""
        stream.progress = time.monotonic()  # built: from now on the client must read
        for msg in messages:
            if not stream.context.is_active():
                return
            stream.progress = time.monotonic()
            yield msg

    def close(self, stream: Stream) -> None:
        with self._lock:
            self._sending.pop(id(stream), None)
        self.slots.release(stream.client)

    def _preempt(self) -> bool:
        """Cancel the stream whose client has taken no data the longest, if for ``preempt_s`` or more."""
        now = time.monotonic()
        with self._lock:
            stalled = [s for s in self._sending.values()
                       if not s.cancelled and s.progress is not None and now - s.progress >= self.preempt_s]
            if not stalled:
                return False
            victim = min(stalled, key=lambda s: s.progress)
            victim.cancelled = True
        log.info("GetSubnetWeights -> CANCELLED: every stream slot is taken and this client took no data for "
                 "%.0f s", now - victim.progress)
        victim.context.cancel()
        return True

    def _watch(self) -> None:
        """Cancel a stream whose client has taken no message for ``stall_s``: its thread waits on flow
        control, and only a cancel from outside frees it."""
        while not self._closed.wait(min(1.0, self.stall_s / 4)):
            now = time.monotonic()
            with self._lock:
                stuck = [s for s in self._sending.values() if s.progress is not None and now - s.progress > self.stall_s]
            for s in stuck:
                log.info("GetSubnetWeights -> CANCELLED: the client took no data for %.0f s", now - s.progress)
                s.context.cancel()

    def stop(self) -> None:
        self._closed.set()
