"""Calls whose request has not arrived yet: bounded in time and in number, and never in health's way.

grpc's threaded server reads a unary call's request in a pool thread: a call whose HTTP/2
HEADERS came but whose DATA never does holds that thread (and one of ``maximum_concurrent_rpcs``)
until the client goes away. Two sockets with 128 such calls once made every other client's
health Check answer RESOURCE_EXHAUSTED. So, outermost of the interceptors, :class:`BodyGuard`

* serves every method as a streaming-request one (the same bytes on the wire: a unary request
  is a stream of one message), so that requests are read by our code, which keeps a
  :class:`Waiting` register of the calls whose next request has not arrived;
* ends a call whose request has not arrived within ``timeout`` seconds (UNAVAILABLE: a retry
  with its body will do), and bounds how many may wait at once per connection, per client
  address and per thread pool: over a bound, waiters of that scope that have waited
  :data:`MIN_AGE` are ended, those of the connections holding most waiters first, then the
  oldest (a well-behaved call's request is there within milliseconds, so bursts of them pass,
  and a lone probe beside a flood goes last; the calls ended hold threads without sending);
* runs health ``Check`` and ``Watch`` on a thread pool of their own (grpc's
  ``experimental_thread_pool`` of a behaviour), where few of the threads may be waiting, so
  that a probe always finds a thread;
* refuses a call at once (RESOURCE_EXHAUSTED, without reading its request, on a small pool of
  its own) when its pool's queue is long: the bound ``maximum_concurrent_rpcs`` used to give,
  which also counted half-open calls and so refused health too.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable

import grpc

__all__ = ["BodyGuard", "HEALTH_PREFIX", "MIN_AGE", "Waiting", "client_address"]

log = logging.getLogger("ofa_server")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
MIN_AGE = 0.1  # seconds a call may wait for its request before it can be crowded out (health: less)
LONE_AGE = 10  # times MIN_AGE for a call alone on a connection that has sent requests before (see Waiting)
DELIVERED_CONNECTIONS = 4096  # such connections remembered (the most recent)


def _end(context: grpc.ServicerContext, why: str) -> None:
    """End a call from another thread, as UNAVAILABLE with ``why`` (the core call's own cancel, which takes a
    status; grpc's public ``cancel`` says CANCELLED, the fallback)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        from grpc._cython import cygrpc

        call.cancel(cygrpc.StatusCode.unavailable, why)
    except Exception:  # another grpc build: the public way
        context.cancel()


def client_address(peer: str) -> str:
    """The client address of a grpc peer string (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


@dataclass
class _Waiter:
    context: Any
    connection: str
    address: str
    since: float


class Waiting:
    """The calls of one pool whose request has not arrived. A reaper thread, every ``min_age / 4`` seconds,
    ends those waiting ``timeout`` seconds, and, where more than ``per_connection``, ``per_address`` or
    ``total`` wait in one scope, those that have waited ``min_age``, of the busiest connections first (a
    well-behaved call's request is there within milliseconds, so a burst of them is never ended: only calls
    that hold a thread without sending are). A call alone on a connection whose requests have arrived before
    (a probe, a client's next call) is ended only after ``LONE_AGE`` times ``min_age``: on a saturated machine
    such a request was seen arriving after more than 0.1 s and ended. A fresh connection earns no such
    patience, so an attacker opening a connection per silent call is crowded out as fast as before; one that
    sends a real request on each connection first (work the server answers) gets 1 s instead of 0.1 s.
    ``on_end(reason)`` is told of each call it ends ("timeout" or "crowded")."""

    def __init__(self, timeout: float, per_connection: int, per_address: int, total: int,
                 on_end: Callable[[str], None] = lambda reason: None, min_age: float = MIN_AGE) -> None:
        self.timeout, self.on_end, self.min_age = timeout, on_end, min_age
        self.bounds = (("connection", per_connection), ("address", per_address), ("server", total))
        self._lock = threading.Lock()
        self._waiters: OrderedDict[int, _Waiter] = OrderedDict()  # oldest first
        self._delivered: OrderedDict[str, None] = OrderedDict()  # connections whose requests came, newest last
        self._keys = itertools.count()
        self._closed = threading.Event()
        self._wake = threading.Event()  # set by enter: an idle server's reaper sleeps
        threading.Thread(target=self._reap, name="ofa-body-timeout", daemon=True).start()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._waiters)

    def enter(self, context: grpc.ServicerContext) -> int:
        """Register a call whose request is about to be read; returns its key for :meth:`leave`."""
        peer = context.peer()
        with self._lock:
            key = next(self._keys)
            self._waiters[key] = _Waiter(context, peer, client_address(peer), time.monotonic())
        self._wake.set()
        return key

    def leave(self, key: int, delivered: bool = True) -> bool:
        """The call's request came (``delivered``) or it ended without one: False when this register had already
        ended the call. Only a delivered request earns its connection patience."""
        with self._lock:
            w = self._waiters.pop(key, None)
            if w is not None and delivered:
                self._delivered[w.connection] = None
                self._delivered.move_to_end(w.connection)
                if len(self._delivered) > DELIVERED_CONNECTIONS:
                    self._delivered.popitem(last=False)
            return w is not None

    def close(self) -> None:
        self._closed.set()
        self._wake.set()

    def _due(self, now: float) -> list[tuple[_Waiter, str]]:
        """Take out the waiters to end now, each with its reason (under the lock)."""
        out = [(self._waiters.pop(k), "timeout") for k, w in list(self._waiters.items())
               if now - w.since >= self.timeout]
        for scope, bound in self.bounds:
            groups: dict[str, list[int]] = {}
            per_connection: dict[str, int] = {}
            for k, w in self._waiters.items():
                groups.setdefault("" if scope == "server" else getattr(w, scope), []).append(k)
                per_connection[w.connection] = per_connection.get(w.connection, 0) + 1
            for keys in groups.values():
                old = [k for k in keys if now - self._waiters[k].since >= self.min_age * self._patience(
                    self._waiters[k].connection, per_connection)]
                # the connections holding most waiters first, then the oldest: a lone probe goes last
                old.sort(key=lambda k: (-per_connection[self._waiters[k].connection], self._waiters[k].since))
                out += [(self._waiters.pop(k), "crowded") for k in old[: max(0, len(keys) - bound)]]
        return out

    def _patience(self, connection: str, per_connection: dict[str, int]) -> float:
        """How many ``min_age`` a waiter of ``connection`` may wait before it can be crowded out."""
        return LONE_AGE if per_connection[connection] == 1 and connection in self._delivered else 1

    def _reap(self) -> None:
        while not self._closed.wait(self.min_age / 4):
            try:
                with self._lock:
                    idle = not self._waiters
                    if idle:
                        self._wake.clear()
                if idle:
                    self._wake.wait()
                    continue
                with self._lock:
                    due = self._due(time.monotonic())
                for w, reason in due:
                    self.on_end(reason)
                    _end(w.context, f"the request did not arrive within {self.timeout:g} s" if reason == "timeout"
                         else "the request did not arrive, and newer calls needed the room")
            except Exception:  # noqa: BLE001 - a reaper that died would let every call wait for ever
                log.exception("ending calls whose request did not arrive")


class BodyGuard(grpc.ServerInterceptor):
    """The interceptor of the module's docstring: ``pools`` maps "health" and "default" to
    (executor or None for grpc's own, its :class:`Waiting`, queue bound)."""

    def __init__(self, pools: dict[str, tuple[futures.ThreadPoolExecutor | None, Waiting, int]],
                 default_executor: futures.ThreadPoolExecutor, on_refused: Callable[[], None] = lambda: None) -> None:
        self.pools, self.default_executor, self.on_refused = pools, default_executor, on_refused
        self.refusals = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="ofa-refuse")

        def refuse(requests, context):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is at its limit of queued calls; retry "
                          "with backoff")

        refuse.experimental_thread_pool = self.refusals
        self._refuse = grpc.stream_unary_rpc_method_handler(refuse)  # a status only: fits every kind of method

    def close(self) -> None:
        for _, waiting, _ in self.pools.values():
            waiting.close()
        self.refusals.shutdown(wait=False)

    @staticmethod
    def _queued(executor: futures.ThreadPoolExecutor) -> int:
        queue = getattr(executor, "_work_queue", None)
        return queue.qsize() if queue is not None else 0

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None  # an unknown method: grpc answers it at once
        behaviour = next(b for b in (handler.unary_unary, handler.unary_stream, handler.stream_unary,
                                     handler.stream_stream) if b is not None)
        if getattr(behaviour, "experimental_thread_pool", None) is not None:
            return handler  # a refusal that never reads the request runs where it chose (auth.TokenAuth)
        executor, waiting, max_queued = self.pools["health" if details.method.startswith(HEALTH_PREFIX) else "default"]
        if self._queued(executor or self.default_executor) >= max_queued:
            self.on_refused()
            return self._refuse
        behaviour, make = _guarded(handler, waiting, details.method[:200])
        if executor is not None:
            behaviour.experimental_thread_pool = executor
        # requests arrive as bytes: a unary call's is parsed here (_first), a stream's by its own handler
        streaming = handler.request_streaming
        return make(behaviour, request_deserializer=handler.request_deserializer if streaming else None,
                    response_serializer=handler.response_serializer)


def _guarded(handler: grpc.RpcMethodHandler, waiting: Waiting, method: str):
    """The handler's behaviour reading its request(s) under ``waiting``, and the grpc maker of its new handler
    (every kind becomes a streaming-request one: the same bytes on the wire)."""
    parse = handler.request_deserializer or (lambda b: b)
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        def unary(requests, context):
            return inner(_first(requests, context, waiting, method, parse), context)

        return unary, grpc.stream_unary_rpc_method_handler
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        def stream(requests, context):
            yield from inner_stream(_first(requests, context, waiting, method, parse), context)

        return stream, grpc.stream_stream_rpc_method_handler
    inner_any = handler.stream_unary or handler.stream_stream
    make = grpc.stream_unary_rpc_method_handler if handler.stream_unary else grpc.stream_stream_rpc_method_handler

    def streams(requests, context):  # (reflection) each next message read under the same bound
        return inner_any(_each(requests, context, waiting), context)

    return streams, make


def _read(requests, context: grpc.ServicerContext, waiting: Waiting):
    """The next message of ``requests`` (None at their end) read while registered in ``waiting``; a call the
    register ended meanwhile (its message may have come just then) is not served: it has its status."""
    key, message = waiting.enter(context), None
    try:
        message = next(requests, None)  # an RpcError when the call ends meanwhile: grpc's own end of it
    finally:
        kept = waiting.leave(key, delivered=message is not None)
    if not kept:
        context.abort(grpc.StatusCode.UNAVAILABLE, "the request did not arrive in time")
    return message


def _first(requests, context: grpc.ServicerContext, waiting: Waiting, method: str, parse: Callable[[bytes], Any]):
    """The one request of a unary call: read under ``waiting``, then parsed (a malformed one is refused)."""
    raw = _read(requests, context, waiting)
    if raw is None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} takes exactly one request message, got none")
    try:
        return parse(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and kin: the client sent bytes that do not parse
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request of {method} is not a valid message")


def _each(requests, context: grpc.ServicerContext, waiting: Waiting):
    while True:
        message = _read(requests, context, waiting)
        if message is None:
            return
        yield message
