"""The ``ofa.v1.SubnetService`` servicer: validation → registry → search or weights → response.

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
from typing import Any, Callable, Iterator

import grpc

from ofa.calibrate import CalibrationCancelled
from ofa.predict.latency import LatencyTableError, Speed
from ofa.search import Candidate, Infeasible, SearchCancelled, UnknownTarget
from ofa.space import Arch
from ofa_client.v1 import subnet_service_pb2 as pb
from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc

from . import validation as v
from .auth import Tokens
from .registry import (NotOwner, Registry, ServedSupernet, StorageError, TargetExists, TooManyTargets,
                       target_summary)
from .searcher import SearchPool, WorkerLost
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
        except v.RequestError as e:
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
        msg = v.bounded(msg, self.max_message_chars)
        log.info("%s -> %s (%.1f ms): %s", method.__name__, code.name, 1000 * (time.perf_counter() - t0), msg)
        context.abort(code, msg)

    return wrapper


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` value, or None."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


class SubnetService(pb_grpc.SubnetServiceServicer):
    def __init__(self, registry: Registry, max_searches: int = 2, cache_bytes: int = 512 << 20,
                 max_builds: int | None = None, max_search_seconds: float = 300.0,
                 on_ready: Callable[[int], None] = lambda n: None, max_message_chars: int = v.MESSAGE_CHARS,
                 max_streams: int = 32, stream_stall_s: float = 30.0, max_per_peer: int | None = None,
                 max_streams_per_peer: int = 4, stream_preempt_s: float = 5.0,
                 max_search_work: int = v.LIMITS["work"], tokens: Tokens | None = None) -> None:
        self.registry = registry
        self.tokens = tokens
        per_peer = max_per_peer or max(1, max_searches // 2)
        self._searches = Slots(max_searches, per_peer, "searches", "--max-searches", "--max-per-peer")
        self._builds = Slots(max_builds or max_searches, per_peer, "weight builds", "--max-searches",
                             "--max-per-peer")
        self._streams = Slots(max_streams, max_streams_per_peer, "weight streams", "--max-streams",
                              "--max-streams-per-peer")
        self.max_streams, self.stream_stall_s, self.stream_preempt_s = max_streams, stream_stall_s, stream_preempt_s
        self.max_search_work = max_search_work
        self._streams_lock = threading.Lock()
        self._sending: dict[int, list] = {}  # the weight streams being sent: [context, last progress]
        self._closed = threading.Event()
        threading.Thread(target=self._watch_streams, name="ofa-stream-watch", daemon=True).start()
        self.max_message_chars = max_message_chars
        self.cache = WeightsCache(cache_bytes)
        self.pool = SearchPool(max_searches, tuple(str(sn.artifact.path) for sn in registry.supernets.values()),
                               max_seconds=max_search_seconds, on_ready=on_ready)

    # ---- helpers -----------------------------------------------------------------
    def _supernet(self, name: str) -> ServedSupernet:
        sns = self.registry.supernets
        if not name:
            if len(sns) == 1:
                return next(iter(sns.values()))
            raise v.invalid(f"supernet is required: this server holds {sorted(sns)}")
        if name not in sns:
            raise v.RequestError(grpc.StatusCode.NOT_FOUND, f"supernet {name[:80]!r} is not served here; "
                                 f"known: {sorted(sns)}")
        return sns[name]

    def _check_target(self, sn: ServedSupernet, target: str | None) -> None:
        if target is not None and target not in self.registry.tables(sn):
            why = sn.scorer.refused.get(target)
            raise v.RequestError(grpc.StatusCode.NOT_FOUND, f"target {target!r} of supernet {sn.name!r} cannot be "
                                 f"used: {why}" if why else f"target {target!r} is not known for supernet "
                                 f"{sn.name!r}; known targets: {self.registry.known_targets(sn)}")

    def _client(self, context: grpc.ServicerContext) -> str:
        """The calling client's name from its token ("" on a server without tokens: one client, all owners)."""
        return (self.tokens.client_of(context.invocation_metadata()) or "") if self.tokens else ""

    @staticmethod
    @contextlib.contextmanager
    def _slot(slots: Slots, context: grpc.ServicerContext) -> Iterator[None]:
        """Hold one of ``slots`` for the calling peer, or refuse at once with RESOURCE_EXHAUSTED (no queueing)."""
        peer = context.peer()
        why = slots.acquire(peer)
        if why:
            raise v.RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        try:
            yield
        finally:
            slots.release(peer)

    @staticmethod
    def _subnet(sn: ServedSupernet, c: Candidate, seconds: float, target: str | None, speed: Speed) -> pb.Subnet:
        a = c.arch
        msg = pb.Subnet(id=a.id, arch=pb.Arch(kernel=a.kernel, expand=a.expand, depth=a.depth, resolution=a.resolution),
                        predicted_accuracy=c.accuracy, macs=c.macs, params=c.params, search_seconds=seconds,
                        supernet=sn.name, target=target or "", speed=speed.scale if target else 0.0,
                        speed_offset_ms=speed.offset_ms if target else 0.0)
        if c.latency_ms is not None:
            msg.predicted_latency_ms = c.latency_ms
        return msg

    # ---- RPCs --------------------------------------------------------------------
    @_handled
    def ListSupernets(self, request: pb.ListSupernetsRequest, context) -> pb.ListSupernetsResponse:
        out = []
        for name, sn in sorted(self.registry.supernets.items()):
            sp, data = sn.artifact.space, sn.artifact.data
            space = pb.SearchSpace(name=sp.name, kernel_choices=sp.kernel_choices, expand_choices=sp.expand_choices,
                                   depth_choices=sp.depth_choices, resolutions=sp.resolutions,
                                   stages=[pb.Stage(width=s.width, stride=s.stride, activation=s.act,
                                                    squeeze_excite=s.se) for s in sp.stages],
                                   in_channels=sp.in_channels, num_classes=sp.num_classes,
                                   definition_json=sp.to_json())
            msg = pb.Supernet(name=name, digest=sn.artifact.digest, space=space,
                              data=pb.DataDescription(dataset=data.name, channels=data.channels,
                                                      image_size=data.image_size, num_classes=data.num_classes,
                                                      mean=data.mean, std=data.std, class_names=data.class_names),
                              targets=self.registry.known_targets(sn))
            acc = sn.scorer.accuracy
            if acc is not None:
                test = acc.info.get("test", {})
                msg.accuracy_predictor.CopyFrom(pb.PredictorQuality(
                    family=acc.family, train_samples=int(acc.info.get("train_samples", 0)),
                    test_samples=int(acc.info.get("test_samples", 0)),
                    kendall_tau=float(test.get("kendall_tau", 0.0)), rmse=float(test.get("rmse", 0.0)),
                    kendall_tau_ceiling=float(test.get("tau_ceiling", 0.0))))
            out.append(msg)
        return pb.ListSupernetsResponse(supernets=out)

    @_handled
    def ListTargets(self, request: pb.ListTargetsRequest, context) -> pb.ListTargetsResponse:
        sn = self._supernet(request.supernet)
        return pb.ListTargetsResponse(targets=[pb.Target(**target_summary(name, sn.name, table, source))
                                               for name, (table, source) in sorted(self.registry.tables(sn).items())])

    @_handled
    def RegisterTarget(self, request: pb.RegisterTargetRequest, context) -> pb.Target:
        sn = self._supernet(request.supernet)
        size = len(request.table_json.encode())
        if size > self.registry.table_bytes:
            raise v.invalid(f"table_json must be at most {self.registry.table_bytes} bytes, got {size}")
        try:
            table = self.registry.register(sn, request.table_json, request.replace, self._client(context))
        except NotOwner as e:
            raise v.RequestError(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None
        except TargetExists as e:
            raise v.RequestError(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
        except TooManyTargets as e:
            raise v.RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except StorageError as e:  # a full disk may free up (RESOURCE_EXHAUSTED); read-only needs an operator
            raise v.RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED if e.full else grpc.StatusCode.UNAVAILABLE,
                                 str(e)) from None
        except LatencyTableError as e:
            raise v.invalid(f"table_json: {e}") from None
        return pb.Target(**target_summary(table["target"], sn.name, table, "registered"))

    @_handled
    def DeleteTarget(self, request: pb.DeleteTargetRequest, context) -> pb.DeleteTargetResponse:
        sn = self._supernet(request.supernet)
        name = v.target_of(request.target, required=True)
        try:
            self.registry.delete(sn, name, self._client(context))
        except NotOwner as e:
            raise v.RequestError(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None
        except TargetExists as e:
            raise v.RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        except KeyError:
            raise v.RequestError(grpc.StatusCode.NOT_FOUND, f"no registered target {name!r} for supernet "
                                 f"{sn.name!r}; registered: {sorted(self.registry.registered_tables(sn))}") from None
        except StorageError as e:
            raise v.RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        return pb.DeleteTargetResponse(target=name)

    def _search_inputs(self, request, front: bool):
        sn = self._supernet(request.supernet)
        target = v.target_of(request.target)
        constraints = v.constraints_of(request.constraints, sn.artifact.space, target)
        settings = v.settings_of(request.options, request.seed, front)
        self._check_target(sn, target)
        table = self.registry.tables(sn)[target][0] if target else None
        speed = v.speed_of_timings(request.reference_timings, table, target)
        if sn.scorer.accuracy is None:
            raise v.RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"supernet {sn.name!r} has no accuracy predictor; run `ofa predictors` on it")
        applied = speed if speed is not None else Speed.from_dict((table or {}).get("recalibration"))
        return sn, target, constraints, settings, speed, applied

    @_handled
    def SearchSubnet(self, request: pb.SearchSubnetRequest, context) -> pb.Subnet:
        sn, target, constraints, settings, speed, applied = self._search_inputs(request, front=False)
        v.check_work(settings, 1, self.max_search_work)
        with self._slot(self._searches, context):
            result = self.pool.run("search", str(sn.artifact.path), self.registry.extra_table(sn, target), speed,
                                   (constraints, target, settings), lambda: not context.is_active(),
                                   _deadline(context))
        sn.remember(result.best.arch)
        return self._subnet(sn, result.best, result.seconds, target, applied)

    @_handled
    def GetParetoFront(self, request: pb.GetParetoFrontRequest, context) -> pb.ParetoFront:
        sn, target, constraints, settings, speed, applied = self._search_inputs(request, front=True)
        points = v.points_of(request.points)
        v.check_work(settings, points, self.max_search_work)
        t0 = time.perf_counter()
        with self._slot(self._searches, context):
            front = self.pool.run("pareto", str(sn.artifact.path), self.registry.extra_table(sn, target), speed,
                                  (points, target, constraints, settings), lambda: not context.is_active(),
                                  _deadline(context))
        seconds = time.perf_counter() - t0
        for c in front:
            sn.remember(c.arch)
        return pb.ParetoFront(points=[self._subnet(sn, c, seconds, target, applied) for c in front],
                              search_seconds=seconds)

    def _weights(self, request: pb.GetSubnetWeightsRequest, context) -> Iterator[pb.GetSubnetWeightsResponse]:
        sn = self._supernet(request.supernet)
        fmt = v.format_of(request.format)
        arch: Arch | None = v.arch_of(request.arch, sn.artifact.space) if request.HasField("arch") else None
        if request.subnet_id:
            sid = v.subnet_id_of(request.subnet_id)
            if arch is not None and arch.id != sid:
                raise v.invalid(f"subnet_id {sid} is not the id of the arch given ({arch.id})")
            arch = arch or sn.lookup(sid)
            if arch is None:
                raise v.RequestError(grpc.StatusCode.NOT_FOUND,
                                     f"subnet {sid} is not known to this server; send its arch instead")
        if arch is None:
            raise v.invalid("give subnet_id or arch")
        key = (sn.artifact.digest, arch.id, fmt)
        searched = sn.lookup(arch.id) is not None  # else any arch a client made up: cached apart
        payload = self.cache.get(key, searched)
        if payload is None:
            with self._slot(self._builds, context):
                payload = self.cache.get_or_build(key, lambda: build_payload(
                    sn.artifact, arch, fmt, should_stop=lambda: not context.is_active()), searched)
        data = sn.artifact.data
        header = pb.WeightsHeader(
            format=request.format, total_bytes=len(payload.data), sha256=payload.sha256, subnet_id=arch.id,
            arch=pb.Arch(kernel=arch.kernel, expand=arch.expand, depth=arch.depth, resolution=arch.resolution),
            input_shape=[1, data.channels, arch.resolution, arch.resolution], mean=data.mean, std=data.std,
            supernet_digest=sn.artifact.digest, calibration_images=payload.calibration_images)
        # the chunks are cut as they are sent: a list of them would hold a second copy of the payload
        chunks = (pb.GetSubnetWeightsResponse(chunk=payload.data[i : i + CHUNK_BYTES])
                  for i in range(0, len(payload.data), CHUNK_BYTES))
        return itertools.chain([pb.GetSubnetWeightsResponse(header=header)], chunks)

    def _refuse(self, why: str, context) -> None:
        raise v.RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

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
        peer = context.peer()
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
        self._closed.set()
        self.pool.close()
