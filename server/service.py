"""The ``ofa.v1.SubnetService`` servicer: it converts a request (:mod:`.convert`), calls the registry, the
search pool or the weights cache, and maps their errors to statuses.

A client's mistake ends as a status with a message (and one INFO log line, no
traceback); only a server bug logs a traceback, as INTERNAL, and the server goes on.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from ofa.calibrate import CalibrationCancelled
from ofa.predict.latency import LatencyTableError, Speed
from ofa.search import Constraints, Infeasible, SearchCancelled, SearchSettings, UnknownTarget
from ofa.space import Arch
from ofa_client.v1 import API_VERSION
from ofa_client.v1 import subnet_service_pb2 as pb
from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc

from . import convert as cv
from .args import ServeConfig
from .auth import Tokens
from .registry import KnownTarget, NotOwner, Registry, ServedSupernet, StorageError, TargetExists, TooManyTargets
from .searcher import Job, ParetoJob, SearchJob, SearchPool, WorkerLost
from .guard import client_address
from .slots import Slots
from .weights import WeightsCache, build_payload

__all__ = ["CHUNK_BYTES", "SubnetService"]

log = logging.getLogger("ofa_server")
CHUNK_BYTES = 1 << 20


def _handled(method: Callable) -> Callable:
    """Map the outcome of a handler to a status; never let an exception kill the server."""

    @functools.wraps(method)
    def wrapper(self: "SubnetService", request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        try:
            return method(self, request, context)
        except cv.RequestError as e:
            code, msg = e.code, e.message
        except Infeasible as e:
            code, msg = grpc.StatusCode.FAILED_PRECONDITION, str(e)
        except UnknownTarget as e:
            code, msg = grpc.StatusCode.NOT_FOUND, str(e)
        except (WorkerLost, TimeoutError) as e:  # a worker died or hung, a build ran too long: a retry can succeed
            code, msg = grpc.StatusCode.UNAVAILABLE, str(e)
        except (SearchCancelled, CalibrationCancelled):
            expired = context.time_remaining() is not None and context.time_remaining() <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            msg = "the deadline passed" if expired else "the request was cancelled"
        except Exception:  # a bug of ours: keep serving, say so, keep the traceback for us
            log.exception("%s failed", method.__name__)
            code, msg = grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; the server log has details"
        msg = cv.bounded(msg, self.max_message_chars)
        log.info("%s -> %s (%.1f ms): %s", method.__name__, code.name, 1000 * (time.perf_counter() - t0), msg)
        context.abort(code, msg)

    return wrapper


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` value, or None."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


@dataclass(frozen=True)
class _Search:
    """A search request, checked: what to search, and on which scorer."""

    sn: ServedSupernet
    target: str | None
    constraints: Constraints
    settings: SearchSettings
    found: KnownTarget | None  # the target's table, from the one scan of the targets folder
    speed: Speed | None  # the device's speed the request's timings imply
    applied: Speed  # the speed the answer's latencies are predicted at


class SubnetService(pb_grpc.SubnetServiceServicer):
    """The service; ``config`` bounds what it takes on (searches, streams, work per request)."""

    def __init__(self, registry: Registry, config: ServeConfig = ServeConfig(), tokens: Tokens | None = None,
                 on_ready: Callable[[int], None] = lambda n: None) -> None:
        self.registry, self.tokens = registry, tokens
        self._searches = Slots(config.max_searches, config.per_peer, "searches", "--max-searches", "--max-per-peer")
        self._builds = Slots(config.max_searches, config.per_peer, "weight builds", "--max-searches",
                             "--max-per-peer")
        self._streams = Slots(config.max_streams, config.max_streams_per_peer, "weight streams", "--max-streams",
                              "--max-streams-per-peer")
        self.max_streams, self.stream_stall_s = config.max_streams, config.stream_stall_s
        self.stream_preempt_s, self.max_search_work = config.stream_preempt_s, config.max_search_work
        self.max_message_chars = config.max_message_chars
        self._streams_lock = threading.Lock()
        self._sending: dict[int, list] = {}  # the weight streams being sent: [context, last progress]
        self._closed = threading.Event()
        threading.Thread(target=self._watch_streams, name="ofa-stream-watch", daemon=True).start()
        self.cache = WeightsCache(config.cache_mb << 20)
        self.pool = SearchPool(config.max_searches, {str(sn.artifact.path): sn.scorer
                                                     for sn in registry.supernets.values()},
                               max_seconds=config.max_search_seconds, on_ready=on_ready)

    @property
    def search_slots(self) -> Slots:
        """The search slots (server-wide and per peer): a search that finds none is RESOURCE_EXHAUSTED."""
        return self._searches

    @property
    def searches_running(self) -> int:
        """Searches (and fronts) running now."""
        return self._searches.held

    @property
    def streams_open(self) -> int:
        """Weight streams being sent now."""
        return self._streams.held

    # ---- helpers -----------------------------------------------------------------
    def _supernet(self, name: str) -> ServedSupernet:
        sns = self.registry.supernets
        if not name:
            if len(sns) == 1:
                return next(iter(sns.values()))
            raise cv.invalid(f"supernet is required: this server holds {sorted(sns)}")
        if name not in sns:
            raise cv.RequestError(grpc.StatusCode.NOT_FOUND, f"supernet {name[:80]!r} is not served here; "
                                  f"known: {sorted(sns)}")
        return sns[name]

    @staticmethod
    def _target(sn: ServedSupernet, target: str | None, targets: dict[str, KnownTarget]) -> KnownTarget | None:
        """The target a search names, from the targets of one scan (None for no target)."""
        if target is None:
            return None
        if target not in targets:
            why = sn.scorer.refused.get(target)
            raise cv.RequestError(grpc.StatusCode.NOT_FOUND, f"target {target!r} of supernet {sn.name!r} cannot be "
                                  f"used: {why}" if why else f"target {target!r} is not known for supernet "
                                  f"{sn.name!r}; known targets: {sorted(targets)}")
        return targets[target]

    def _client(self, context: grpc.ServicerContext) -> str:
        """The calling client's name from its token ("" on a server without tokens: one client, all owners)."""
        return (self.tokens.client_of(context.invocation_metadata()) or "") if self.tokens else ""

    def _identity(self, context: grpc.ServicerContext) -> str:
        """Who a per-client limit counts: the token's client name when tokens are on, else the client's address
        (not its connection: more connections must not buy more slots)."""
        name = self.tokens.client_of(context.invocation_metadata()) if self.tokens else None
        return f"client {name}" if name else client_address(context.peer())

    @contextlib.contextmanager
    def _slot(self, slots: Slots, context: grpc.ServicerContext) -> Iterator[None]:
        """Hold one of ``slots`` for the calling client, or refuse at once with RESOURCE_EXHAUSTED (no queueing)."""
        peer = self._identity(context)
        why = slots.acquire(peer)
        if why:
            raise cv.RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        try:
            yield
        finally:
            slots.release(peer)

    # ---- RPCs --------------------------------------------------------------------
    @_handled
    def ListSupernets(self, request: pb.ListSupernetsRequest, context) -> pb.ListSupernetsResponse:
        return pb.ListSupernetsResponse(api_version=API_VERSION, supernets=[
            cv.supernet_to_pb(name, sn.artifact, sn.scorer.accuracy, self.registry.known_targets(sn))
            for name, sn in sorted(self.registry.supernets.items())])

    @_handled
    def ListTargets(self, request: pb.ListTargetsRequest, context) -> pb.ListTargetsResponse:
        sn = self._supernet(request.supernet)
        return pb.ListTargetsResponse(targets=[cv.target_to_pb(name, sn.name, t.table, t.source)
                                               for name, t in sorted(self.registry.targets(sn).items())])

    @_handled
    def RegisterTarget(self, request: pb.RegisterTargetRequest, context) -> pb.Target:
        sn = self._supernet(request.supernet)
        size = len(request.table_json.encode())
        if size > self.registry.table_bytes:
            raise cv.invalid(f"table_json must be at most {self.registry.table_bytes} bytes, got {size}")
        try:
            table = self.registry.register(sn, request.table_json, request.replace, self._client(context))
        except NotOwner as e:
            raise cv.RequestError(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None
        except TargetExists as e:
            raise cv.RequestError(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
        except TooManyTargets as e:
            raise cv.RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except StorageError as e:  # a full disk may free up (RESOURCE_EXHAUSTED); read-only needs an operator
            raise cv.RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED if e.full else grpc.StatusCode.UNAVAILABLE,
                                  str(e)) from None
        except LatencyTableError as e:
            raise cv.invalid(f"table_json: {e}") from None
        return cv.target_to_pb(table["target"], sn.name, table, "registered")

    @_handled
    def DeleteTarget(self, request: pb.DeleteTargetRequest, context) -> pb.DeleteTargetResponse:
        sn = self._supernet(request.supernet)
        name = cv.target_of(request.target, required=True)
        try:
            self.registry.delete(sn, name, self._client(context))
        except NotOwner as e:
            raise cv.RequestError(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None
        except TargetExists as e:
            raise cv.RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        except KeyError:
            raise cv.RequestError(grpc.StatusCode.NOT_FOUND, f"no registered target {name!r} for supernet "
                                  f"{sn.name!r}; registered: {sorted(self.registry.registered_tables(sn))}") from None
        except StorageError as e:
            raise cv.RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        return pb.DeleteTargetResponse(target=name)

    def _search_inputs(self, request, front: bool) -> _Search:
        sn = self._supernet(request.supernet)
        target = cv.target_of(request.target)
        constraints = cv.constraints_of(request.constraints, sn.artifact.space, target)
        settings = cv.settings_of(request.options, request.seed, front)
        found = self._target(sn, target, self.registry.targets(sn))
        table = found.table if found else None
        speed = cv.speed_of_timings(request.reference_timings, table, target)
        if sn.scorer.accuracy is None:
            raise cv.RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"supernet {sn.name!r} has no accuracy predictor; run `ofa predictors` on it")
        applied = speed if speed is not None else Speed.from_dict((table or {}).get("recalibration"))
        return _Search(sn, target, constraints, settings, found, speed, applied)

    def _run(self, s: _Search, job: Job, context) -> Any:
        """Run ``job`` on a search worker, holding a search slot of the caller's."""
        with self._slot(self._searches, context):
            return self.pool.run(job, str(s.sn.artifact.path), lambda: not context.is_active(),
                                 table=s.found.for_workers if s.found else None, speed=s.speed,
                                 deadline=_deadline(context))

    @_handled
    def SearchSubnet(self, request: pb.SearchSubnetRequest, context) -> pb.Subnet:
        s = self._search_inputs(request, front=False)
        cv.check_work(s.settings, 1, self.max_search_work)
        result = self._run(s, SearchJob(s.constraints, s.target, s.settings), context)
        s.sn.remember(result.best.arch)
        return self._subnet_pb(s, result.best, result.seconds)

    @_handled
    def GetParetoFront(self, request: pb.GetParetoFrontRequest, context) -> pb.ParetoFront:
        s = self._search_inputs(request, front=True)
        points = cv.points_of(request.points)
        cv.check_work(s.settings, points, self.max_search_work)
        t0 = time.perf_counter()
        front = self._run(s, ParetoJob(points, s.target, s.constraints, s.settings), context)
        seconds = time.perf_counter() - t0
        for c in front:
            s.sn.remember(c.arch)
        return pb.ParetoFront(points=[self._subnet_pb(s, c, seconds) for c in front],
                              search_seconds=seconds)

    @staticmethod
    def _subnet_pb(s: _Search, c, seconds: float) -> pb.Subnet:
        interval = s.sn.scorer.accuracy.interval
        return cv.subnet_to_pb(c, seconds, s.sn.name, s.target, s.applied, s.sn.fine_tuned,
                               interval.level if interval is not None else 0.0, s.sn.measured,
                               s.found.table if s.found else None, s.sn.artifact.digest)

    def _arch(self, sn: ServedSupernet, request: pb.GetSubnetWeightsRequest) -> Arch:
        """The arch a weights request asks for: by its arch, its subnet id, or both (which must agree)."""
        arch: Arch | None = cv.arch_of(request.arch, sn.artifact.space) if request.HasField("arch") else None
        if request.subnet_id:
            sid = cv.subnet_id_of(request.subnet_id)
            if arch is not None and arch.id != sid:
                raise cv.invalid(f"subnet_id {sid} is not the id of the arch given ({arch.id})")
            arch = arch or sn.lookup(sid)
            if arch is None:
                raise cv.RequestError(grpc.StatusCode.NOT_FOUND,
                                      f"subnet {sid} is not known to this server; send its arch instead")
        if arch is None:
            raise cv.invalid("give subnet_id or arch")
        return arch

    def _weights(self, request: pb.GetSubnetWeightsRequest, context) -> Iterator[pb.GetSubnetWeightsResponse]:
        sn = self._supernet(request.supernet)
        fmt = cv.format_of(request.format)
        arch = self._arch(sn, request)
        key = (sn.artifact.digest, arch.id, fmt)
        searched = sn.lookup(arch.id) is not None  # else any arch a client made up: cached apart
        payload = self.cache.get(key, searched)
        if payload is None:
            with self._slot(self._builds, context):
                payload = self.cache.get_or_build(key, lambda: build_payload(
                    sn.artifact, arch, fmt, should_stop=lambda: not context.is_active(), images=sn.calibration),
                    searched)
        header = cv.weights_header(request.format, payload, arch, sn.artifact)
        # the chunks are cut as they are sent: a list of them would hold a second copy of the payload
        chunks = (pb.GetSubnetWeightsResponse(chunk=payload.data[i : i + CHUNK_BYTES])
                  for i in range(0, len(payload.data), CHUNK_BYTES))
        return itertools.chain([pb.GetSubnetWeightsResponse(header=header)], chunks)

    def _refuse(self, why: str, context) -> None:
        raise cv.RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

    def _preempt(self) -> bool:
        """All stream slots are taken: cancel the stream whose client has taken no data the longest, if for
        ``stream_preempt_s`` or more (a client that stopped reading), so that a new stream gets its slot."""
        now = time.monotonic()
        with self._streams_lock:
            stalled = [e for e in self._sending.values()
                       if not e[2] and e[1] is not None and now - e[1] >= self.stream_preempt_s]
            if not stalled:
                return False
            victim = min(stalled, key=lambda e: e[1])
            victim[2] = True
        log.info("GetSubnetWeights -> CANCELLED: every stream slot is taken and this client took no data for "
                 "%.0f s", now - victim[1])
        victim[0].cancel()
        return True

    def GetSubnetWeights(self, request: pb.GetSubnetWeightsRequest, context) -> Iterator[pb.GetSubnetWeightsResponse]:
        # A client that reads nothing keeps its stream's handler thread waiting on flow control; at most
        # max_streams of them (threads of their own, on top of the other RPCs'), and the one stalled longest
        # makes way for a new stream when all are taken.
        peer = self._identity(context)
        why = self._streams.acquire(peer)
        if why and not self._streams.at_peer_limit(peer) and self._preempt():
            why = self._streams.acquire(peer, wait=2.0)  # the cancelled stream's thread gives its slot back
        if why:
            _handled(SubnetService._refuse)(self, why, context)
        entry = [context, None, False]  # context, last progress (None while the payload is built), cancelled
        with self._streams_lock:
            self._sending[id(entry)] = entry
        try:
            # all checks and the build happen before the first message, so every refusal is a clean status
            messages = _handled(SubnetService._weights)(self, request, context)
            entry[1] = time.monotonic()  # built (a build is bounded on its own): from now on the client must read
            for msg in messages:
                if not context.is_active():
                    return
                entry[1] = time.monotonic()  # the client took the last message: progress
                yield msg
        finally:
            with self._streams_lock:
                self._sending.pop(id(entry), None)
            self._streams.release(peer)

    def _watch_streams(self) -> None:
        """Cancel a weight stream whose client has taken no message for ``stream_stall_s``: its thread waits
        on flow control, and only a cancel from outside frees it."""
        while not self._closed.wait(min(1.0, self.stream_stall_s / 4)):
            now = time.monotonic()
            with self._streams_lock:
                stuck = [e for e in self._sending.values() if e[1] is not None and now - e[1] > self.stream_stall_s]
            for context, since, _ in stuck:
                log.info("GetSubnetWeights -> CANCELLED: the client took no data for %.0f s", now - since)
                context.cancel()

    def close(self) -> None:
        """Stop watching the streams and stop the search workers."""
        self._closed.set()
        self.pool.close()
