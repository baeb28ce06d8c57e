"""The ``ofa.v1.SubnetService`` servicer: each RPC converts its request (:mod:`.convert`), calls the registry,
the search pool (:mod:`.searcher`) or the served weights (:mod:`.weights`), and answers; :mod:`.status` maps
what goes wrong to a status, :mod:`.streams` keeps the weight streams.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from ofa.jobs.precision import at_int8
from ofa.predict.latency import LatencyTableError, Speed, table_format
from ofa.search import Constraints, SearchSettings
from ofa.space import Arch
from ofa_client.v1 import API_VERSION
from ofa_client.v1 import subnet_service_pb2 as pb
from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc

from . import convert as cv
from .args import ServeConfig
from .auth import Tokens
from .registry import KnownTarget, NotOwner, Registry, ServedSupernet, StorageError, TargetExists, TooManyTargets
from .searcher import Job, ParetoJob, SearchJob, SearchPool
from .guard import client_address
from .kits import Kits
from .slots import Slots
from .status import answering, handled
from .streams import Streams
from .weights import ServedWeights

__all__ = ["CHUNK_BYTES", "SubnetService"]

log = logging.getLogger("ofa_server")
CHUNK_BYTES = 1 << 20


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
    int8: dict[str, Any] | None = None  # an int8 target's measured accuracy drop (ofa int8-accuracy), if any


class SubnetService(pb_grpc.SubnetServiceServicer):
    """The service; ``config`` bounds what it takes on (searches, streams, work per request)."""

    def __init__(self, registry: Registry, config: ServeConfig = ServeConfig(), tokens: Tokens | None = None,
                 on_ready: Callable[[int], None] = lambda n: None) -> None:
        self.registry, self.tokens = registry, tokens
        self._searches = Slots(config.max_searches, config.per_peer, "searches", "--max-searches", "--max-per-peer")
        self._builds = Slots(config.max_searches, config.per_peer, "weight builds", "--max-searches",
                             "--max-per-peer")
        self.streams = Streams(Slots(config.max_streams, config.max_streams_per_peer, "weight streams",
                                     "--max-streams", "--max-streams-per-peer"),
                               config.stream_stall_s, config.stream_preempt_s)
        self.max_search_work, self.max_message_chars = config.max_search_work, config.max_message_chars
        self.weights = ServedWeights(config.cache_mb << 20)
        self.kits = Kits()
        self.pool = SearchPool(config.max_searches, {str(sn.artifact.path): sn.scorer
                                                     for sn in registry.supernets.values()},
                               max_seconds=config.max_search_seconds, on_ready=on_ready,
                               niceness=config.search_niceness)

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
        return self.streams.open_count

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
    @handled
    def ListSupernets(self, request: pb.ListSupernetsRequest, context) -> pb.ListSupernetsResponse:
        return pb.ListSupernetsResponse(api_version=API_VERSION, supernets=[
            cv.supernet_to_pb(name, sn.artifact, sn.scorer.accuracy, self.registry.known_targets(sn))
            for name, sn in sorted(self.registry.supernets.items())])

    @handled
    def ListTargets(self, request: pb.ListTargetsRequest, context) -> pb.ListTargetsResponse:
        sn = self._supernet(request.supernet)
        return pb.ListTargetsResponse(targets=[cv.target_to_pb(name, sn.name, t.table, t.source)
                                               for name, t in sorted(self.registry.targets(sn).items())])

    @handled
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

    @handled
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
        int8 = sn.int8.get(table_format(table)) if table else None  # an int8 format's measured drop
        if int8 and constraints.min_accuracy is not None:  # the floor is on the int8 file's accuracy
            constraints = dataclasses.replace(constraints, min_accuracy=constraints.min_accuracy - int8["mean_drop"])
        return _Search(sn, target, constraints, settings, found, speed, applied, int8)

    def _run(self, s: _Search, job: Job, context) -> Any:
        """Run ``job`` on a search worker, holding a search slot of the caller's."""
        with self._slot(self._searches, context):
            return self.pool.run(job, str(s.sn.artifact.path), lambda: not context.is_active(),
                                 table=s.found.for_workers if s.found else None, speed=s.speed,
                                 deadline=_deadline(context))

    @handled
    def SearchSubnet(self, request: pb.SearchSubnetRequest, context) -> pb.Subnet:
        s = self._search_inputs(request, front=False)
        cv.check_work(s.settings, 1, self.max_search_work)
        result = self._run(s, SearchJob(s.constraints, s.target, s.settings), context)
        s.sn.remember(result.best.arch)
        return self._subnet_pb(s, result.best, result.seconds)

    @handled
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
        level = interval.level if interval is not None else 0.0
        if s.int8:  # the int8 file's accuracy: the measured drop added, the interval widened by its spread
            c = at_int8(c, s.int8, level)
        return cv.subnet_to_pb(c, seconds, s.sn.name, s.target, s.applied, s.sn.fine_tuned, level, s.sn.measured,
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
        payload = self.weights.file(sn.artifact, arch, fmt, searched=sn.lookup(arch.id) is not None,
                                    images=sn.calibration, should_stop=lambda: not context.is_active(),
                                    slot=lambda: self._slot(self._builds, context))
        header = cv.weights_header(request.format, payload, arch, sn.artifact)
        # the chunks are cut as they are sent: a list of them would hold a second copy of the payload
        chunks = (pb.GetSubnetWeightsResponse(chunk=payload.data[i : i + CHUNK_BYTES])
                  for i in range(0, len(payload.data), CHUNK_BYTES))
        return itertools.chain([pb.GetSubnetWeightsResponse(header=header)], chunks)

    def _streamed(self, method: str, context, messages: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """A server stream holding a stream slot: ``messages()`` checks and builds everything before the first
        message (so every refusal is a clean status), then the client takes them at its pace."""
        with answering(context, method, self.max_message_chars):
            stream = self.streams.open(context, self._identity(context))
            if isinstance(stream, str):
                raise cv.RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, stream)
        try:
            with answering(context, method, self.max_message_chars):
                built = messages()
            yield from self.streams.send(stream, built)
        finally:
            self.streams.close(stream)

    def GetSubnetWeights(self, request: pb.GetSubnetWeightsRequest, context) -> Iterator[pb.GetSubnetWeightsResponse]:
        return self._streamed("GetSubnetWeights", context, lambda: self._weights(request, context))

    def _kit(self, request: pb.GetProfileKitRequest, context) -> Iterator[pb.GetProfileKitResponse]:
        sn = self._supernet(request.supernet)
        kit = self.kits.kit(sn.artifact, cv.kit_format_of(request.precision, request.runtime),
                            slot=lambda: self._slot(self._builds, context), gone=lambda: not context.is_active())
        header = pb.ProfileKitHeader(manifest_json=kit.manifest_json, total_bytes=kit.total_bytes, sha256=kit.sha256,
                                     supernet_digest=sn.artifact.digest)
        return itertools.chain([pb.GetProfileKitResponse(header=header)],
                               (pb.GetProfileKitResponse(chunk=c) for c in kit.chunks(CHUNK_BYTES)))

    def GetProfileKit(self, request: pb.GetProfileKitRequest, context) -> Iterator[pb.GetProfileKitResponse]:
        return self._streamed("GetProfileKit", context, lambda: self._kit(request, context))

    def close(self) -> None:
        """Stop watching the streams, stop kit builds still running and the search workers."""
        self.streams.stop()
        self.kits.close()
        self.pool.close()
