"""What operators scrape and read: Prometheus metrics (``--metrics-port``) and one log line per call.

The metrics are prometheus_client objects in a registry of this server's own (two servers in
one process do not share counts), exposed by prometheus_client's HTTP server: calls by RPC and
status code, a latency histogram per RPC, searches in flight and refused, search workers alive,
the weight cache (bytes, hits, misses = builds), registered targets. Every call also leaves one
line in the ``ofa_server.access`` log: in ``--log-format json`` one JSON object with time, level,
rpc, code, ms, peer and message.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any, Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

__all__ = ["JsonFormatter", "Metrics", "MetricsInterceptor", "configure_logging"]

access = logging.getLogger("ofa_server.access")
SEARCH_RPCS = ("SearchSubnet", "GetParetoFront")
UNKNOWN_RPC = "unknown"  # the label of every method path this server does not serve: labels are a closed set


def _known_rpcs() -> dict[str, str]:
    """{"/package.Service/Method": "Method"} of every method this server serves."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from ofa_client.v1 import subnet_service_pb2 as pb

    services = (pb.DESCRIPTOR.services_by_name["SubnetService"], health_pb2.DESCRIPTOR.services_by_name["Health"],
                reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
    return {f"/{svc.full_name}/{m.name}": m.name for svc in services for m in svc.methods}
# latency buckets (s): cached fetches and listings take ms, searches a few hundred ms, builds seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _CacheCounts:
    """The weight cache's own counters, read at scrape time (they live in the cache, not here)."""

    def __init__(self, cache) -> None:
        self.cache = cache

    def collect(self):
        yield CounterMetricFamily("ofa_weight_cache_hits", "weight requests answered from the cache",
                                  value=self.cache.hits)
        yield CounterMetricFamily("ofa_weight_cache_misses", "weight payloads built (not in the cache)",
                                  value=self.cache.misses)


class Metrics:
    """The server's metrics; ``bind`` ties the gauges to the live service, ``serve`` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.calls = Counter("ofa_rpc_calls", "RPCs answered, by method and status code", ["rpc", "code"],
                             registry=r)
        self.seconds = Histogram("ofa_rpc_seconds", "RPC latency, by method", ["rpc"], buckets=BUCKETS, registry=r)
        self.refused = Counter("ofa_searches_refused", "searches refused with RESOURCE_EXHAUSTED", registry=r)
        self.in_flight = Gauge("ofa_searches_in_flight", "searches running now", registry=r)
        self.workers = Gauge("ofa_search_workers_alive", "search worker processes able to take a search", registry=r)
        self.cache_bytes = Gauge("ofa_weight_cache_bytes", "bytes of built weights kept", registry=r)
        self.targets = Gauge("ofa_registered_targets", "latency targets registered (all supernets)", registry=r)
        self.ended = Counter("ofa_calls_ended_waiting", "calls ended because their request did not arrive: "
                             "timeout, or crowded out by newer calls", ["reason"], registry=r)
        self.queue_full = Counter("ofa_calls_refused_queue", "calls refused because their thread pool's queue "
                                  "was full", registry=r)

    def ended_waiting(self, reason: str) -> None:
        self.ended.labels(reason).inc()

    def refused_queued(self) -> None:
        self.queue_full.inc()

    def bind(self, service, registry) -> None:
        """Read the gauges from ``service`` (a SubnetService) and ``registry`` at scrape time."""
        self.in_flight.set_function(lambda: service.searches_running)
        self.workers.set_function(lambda: service.pool.ready)
        self.cache_bytes.set_function(lambda: service.weights.cache.bytes)
        self.targets.set_function(lambda: sum(len(registry.registered_tables(sn))
                                              for sn in registry.supernets.values()))
        self.registry.register(_CacheCounts(service.weights.cache))

    def record(self, rpc: str, code: grpc.StatusCode, seconds: float) -> None:
        self.calls.labels(rpc, code.name).inc()
        self.seconds.labels(rpc).observe(seconds)
        if rpc in SEARCH_RPCS and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.refused.inc()

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose ``/metrics`` on ``host:port`` (0: a free port); the HTTP server, or OSError naming the flag."""
        try:
            http, _ = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise OSError(e.errno, f"--metrics-port {port} on {host}: {e.strerror}") from None
        return http


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times every call and records its status code (in ``metrics``, if any) and one access-log line."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.known = _known_rpcs()

    def _done(self, rpc: str, context, t0: float, failed: bool) -> None:
        code = context.code()
        if not isinstance(code, grpc.StatusCode):  # not set by the handler: it returned, or the call ended
            code = (grpc.StatusCode.OK if not failed else
                    grpc.StatusCode.CANCELLED if not context.is_active() else grpc.StatusCode.UNKNOWN)
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.record(rpc, code, seconds)
        access.info("%s %s %.1f ms", rpc, code.name, 1000 * seconds,
                    extra={"rpc": rpc, "code": code.name, "ms": round(1000 * seconds, 2), "peer": context.peer()})

    def _unary(self, rpc: str, behavior: Callable) -> Callable:
        @functools.wraps(behavior)  # its attributes too: the thread pool it runs on (guard, auth)
        def call(request, context):
            t0, failed = time.perf_counter(), True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                self._done(rpc, context, t0, failed)
        return call

    def _stream(self, rpc: str, behavior: Callable) -> Callable:
        @functools.wraps(behavior)
        def call(request, context):
            t0, failed = time.perf_counter(), True
            try:
                yield from behavior(request, context)
                failed = False
            finally:
                self._done(rpc, context, t0, failed)
        return call

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        rpc = self.known.get(details.method, UNKNOWN_RPC)
        for kind, wrap in (("unary_unary", self._unary), ("stream_unary", self._unary),
                           ("unary_stream", self._stream), ("stream_stream", self._stream)):
            if getattr(handler, kind) is not None:  # (a refusal of a token is a stream_unary handler)
                return handler._replace(**{kind: wrap(rpc, getattr(handler, kind))})
        return handler


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and rpc/code/ms/peer where the line has them."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("rpc", "code", "ms", "peer"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(fmt: str = "text") -> None:
    """This process's log: the human format (with times) or ``json``; replaces the ofa command's."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
