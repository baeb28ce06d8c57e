"""Bounded slots for the server's expensive work, server-wide and per client."""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import Callable, Iterator

__all__ = ["CallGone", "Slots", "take"]


class CallGone(Exception):
    """The caller went away (cancelled, or past its deadline) while it waited for another request's build."""


@contextlib.contextmanager
def take(lock: threading.Lock, gone: Callable[[], bool], poll_s: float = 0.1) -> Iterator[None]:
    """Hold ``lock`` (``with take(...)``), asking ``gone()`` every ``poll_s`` while waiting for it: a call that has
    ended stops waiting (:class:`CallGone`) instead of keeping its stream counted until another request's build
    ends (tens of seconds for a kit)."""
    while not lock.acquire(timeout=poll_s):
        if gone():
            raise CallGone("the call ended while another request built what it asked for")
    try:
        yield
    finally:
        lock.release()


class Slots:
    """At most ``total`` holders at once, and at most ``per_peer`` of them from one client.

    A client is who the caller says (``SubnetService._identity``): the name its token has when the
    server requires tokens, else its address (not its connection: two connections once took both
    search slots). Behind a load balancer without tokens every client shares the balancer's address,
    so there the per-client bound is the balancer's, and tokens tell clients apart.
    """

    def __init__(self, total: int, per_peer: int, what: str, total_flag: str, peer_flag: str) -> None:
        self.total, self.per_peer, self.what = total, per_peer, what
        self._flags = total_flag, peer_flag
        self._lock = threading.Condition()
        self._held: Counter[str] = Counter()

    @property
    def held(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def at_peer_limit(self, peer: str) -> bool:
        with self._lock:
            return self._held[peer] >= self.per_peer

    def acquire(self, peer: str, wait: float = 0.0) -> str | None:
        """Take a slot for ``peer`` (waiting up to ``wait`` seconds for the server-wide limit); None when
        taken, else why not (a message for RESOURCE_EXHAUSTED)."""
        with self._lock:
            ok = lambda: self._held[peer] < self.per_peer and sum(self._held.values()) < self.total  # noqa: E731
            if not self._lock.wait_for(ok, timeout=wait if self._held[peer] < self.per_peer else 0):
                if self._held[peer] >= self.per_peer:
                    return (f"this client ({peer}) already runs {self._held[peer]} {self.what}, the most one "
                            f"client may ({self._flags[1]}); wait for them, or retry with backoff")
                return (f"the server is running its limit of {self.total} concurrent {self.what} "
                        f"({self._flags[0]}); retry with backoff")
            self._held[peer] += 1
            return None

    def release(self, peer: str) -> None:
        with self._lock:
            self._held[peer] -= 1
            if self._held[peer] <= 0:
                del self._held[peer]
            self._lock.notify_all()
