"""``ofa serve``: the gRPC server process (service, health, reflection, optional TLS and token)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ofa._io import atomic_write_text
from ofa_client.v1 import subnet_service_pb2 as pb
from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc

from .args import ServeConfig, add_arguments, config_of
from .auth import TokenAuth, Tokens
from .guard import BodyGuard, Waiting
from .lifecycle import Signals, interrupt_start, read_tls, stop_with_parent
from .metrics import Metrics, MetricsInterceptor, configure_logging
from .registry import Registry
from .service import SubnetService

__all__ = ["BoundedHealth", "ServeConfig", "Server", "add_arguments", "config_of", "main", "run", "serve"]

log = logging.getLogger("ofa_server")
SERVICE = pb.DESCRIPTOR.services_by_name["SubnetService"].full_name
HEALTH_CHECK_THREADS = 64  # health's own threads beside one per Watch; at most a quarter may wait for a request
MAX_STREAMS_PER_CONNECTION = 64  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls open at once on one connection


class _CallbackAtEnd:
    """A call's ``context`` whose ``add_callback`` runs the callback at once where grpc refuses it because the
    call has already ended (it returns False then): the stock health servicer ignores that, and a Watch whose
    deadline passed before it was set up stayed counted for ever (16 such calls took every slot)."""

    def __init__(self, context) -> None:
        self._context = context

    def add_callback(self, callback) -> bool:
        if not self._context.add_callback(callback):
            callback()
        return True

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class BoundedHealth(health.HealthServicer):
    """grpc's health servicer with the bounds it lacks (it is open without a token, for probes):
    service names of at most ``MAX_NAME`` characters, at most ``max_watches`` Watch streams at once,
    and a watched name forgotten when its last stream ends (the stock servicer kept every name
    ever watched, so memory grew per call)."""

    MAX_NAME = 200

    def __init__(self, max_watches: int = 64) -> None:
        super().__init__()
        self.max_watches = max_watches

    def watched_services(self) -> list[str]:
        """The service names that Watch streams are open on now."""
        with self._lock:
            return sorted(self._send_response_callbacks)

    def _check_name(self, request, context) -> None:
        if len(request.service) > self.MAX_NAME:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"service must be at most {self.MAX_NAME} characters, "
                          f"got {len(request.service)}; this server reports {SERVICE!r} and ''")

    def Check(self, request, context):
        self._check_name(request, context)
        return super().Check(request, context)

    def Watch(self, request, context, send_response_callback=None):
        self._check_name(request, context)
        with self._lock:
            open_ = sum(len(c) for c in self._send_response_callbacks.values())
            if open_ >= self.max_watches:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{open_} health watches are open, the most this "
                              f"server keeps; use Check, or retry later")
            return super().Watch(request, _CallbackAtEnd(context), send_response_callback)

    def _on_close_callback(self, send_response_callback, service):
        def callback():
            with self._lock:
                callbacks = self._send_response_callbacks.get(service, set())
                callbacks.discard(send_response_callback)
                if not callbacks:
                    self._send_response_callbacks.pop(service, None)
            send_response_callback(None)

        return callback


class Server:
    """A running server; ``stop`` finishes in-flight calls within ``grace`` seconds.

    ``config`` says where it listens and what it takes on; the registry, the tokens and ``tls`` (a PEM
    certificate chain and key) come made, not from the config's paths (:func:`run` makes them).
    """

    def __init__(self, registry: Registry, config: ServeConfig, tokens: Tokens | None = None,
                 tls: tuple[bytes, bytes] | None = None) -> None:
        self.health = BoundedHealth(config.max_health_watches)
        self._serving = threading.Event()  # between start and stop: health follows the search workers
        self.metrics = Metrics() if config.metrics_port is not None else None
        self.metrics_http, self.metrics_port = None, None
        if self.metrics is not None:  # first: a taken metrics port stops the start (naming its flag) at once
            self.metrics_http = self.metrics.serve(config.metrics_port, config.metrics_host)
            self.metrics_port = self.metrics_http.server_port
        self.service = SubnetService(registry, config, tokens, on_ready=self._workers_ready)
        if self.metrics is not None:
            self.metrics.bind(self.service, registry)
        self.grpc = self._grpc_server(config, tokens, self.metrics)
        pb_grpc.add_SubnetServiceServicer_to_server(self.service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        address = f"{config.host}:{config.port}"
        self._tls_next = None  # a certificate read by SIGHUP, handed to grpc at the next connection
        self._tls_lock = threading.Lock()
        self._drain_cut = threading.Event()  # a forced stop cuts a drain's delay short
        self._closing = threading.Lock()
        self._closed = False
        self._stopped = threading.Event()  # set once the first stop has closed everything
        try:
            if tls:
                first = grpc.ssl_server_certificate_configuration([(tls[1], tls[0])])
                self.port = self.grpc.add_secure_port(address, grpc.dynamic_ssl_server_credentials(
                    first, self._tls_fetch))
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind"
            self.port = 0
        if self.port == 0:
            self.stop(0)  # the search workers it started, the metrics endpoint
            raise OSError(f"cannot listen on {address[:300]}: is --port {config.port} in use, or --host "
                          f"{config.host[:200]!r} not an address of this machine?")
        self.host = config.host

    def _grpc_server(self, config: ServeConfig, tokens: Tokens | None, metrics: Metrics | None) -> grpc.Server:
        # weight streams hold a thread while open (a client that stops reading holds it on flow control): they
        # get threads of their own, so the other RPCs always have `workers`; health has a pool of its own
        self.pool = futures.ThreadPoolExecutor(max_workers=config.workers + config.max_streams,
                                               thread_name_prefix="ofa-rpc")
        self.health_pool = futures.ThreadPoolExecutor(max_workers=config.max_health_watches + HEALTH_CHECK_THREADS,
                                                      thread_name_prefix="ofa-health")
        ended = metrics.ended_waiting if metrics is not None else lambda reason: None
        # calls waiting for their request: per connection, per client address, in all (a quarter of the pool's
        # threads: the rest serve), crowded out after 0.03 s (health: a probe's request is tiny) or 0.1 s
        waiting = {"health": Waiting(config.body_timeout_s, 2, 8, HEALTH_CHECK_THREADS // 4, ended, 0.03),
                   "default": Waiting(config.body_timeout_s, 4, max(2, config.workers // 4), max(2, config.workers // 4),
                                      ended, 0.1)}
        # queued calls are cheap to keep: a call behind a burst of silent ones waits (they are crowded out within
        # a fraction of a second), it is not refused
        self.guard = BodyGuard({"health": (self.health_pool, waiting["health"], 8 * HEALTH_CHECK_THREADS),
                                "default": (None, waiting["default"], 16 * config.workers)}, self.pool,
                               metrics.refused_queued if metrics is not None else lambda: None)
        # outermost first: a call's request is read under the guard; one refused for its token is counted too
        interceptors = [self.guard, MetricsInterceptor(metrics)] + ([TokenAuth(tokens)] if tokens else [])
        return grpc.server(self.pool, interceptors=interceptors,
                           options=[("grpc.max_receive_message_length", 16 << 20),
                                    # a port another server holds is refused, not shared (SO_REUSEPORT)
                                    ("grpc.so_reuseport", 0),
                                    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                                    # dead peers are found, and no connection (nor a stream stuck on
                                    # a client that stopped reading) is held for ever
                                    ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
                                    ("grpc.max_connection_idle_ms", 600_000),
                                    ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                                    ("grpc.max_connection_age_grace_ms", 300_000)])

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            self.health.set(name, status)

    def _workers_ready(self, n: int) -> None:
        """NOT_SERVING while no search worker can take a search (all are being replaced), SERVING again after."""
        if self._serving.is_set():
            self._set_health(n > 0)

    def start(self) -> "Server":
        """Start serving (health SERVING once a search worker is ready); returns the server."""
        self.grpc.start()
        self._serving.set()
        self._set_health(self.service.pool.ready > 0)
        return self

    def set_tls(self, chain: bytes, key: bytes) -> None:
        """Use this certificate chain and key from the next connection on (a server started with TLS)."""
        with self._tls_lock:
            self._tls_next = grpc.ssl_server_certificate_configuration([(key, chain)])

    def _tls_fetch(self):
        with self._tls_lock:  # grpc asks at each handshake: a new configuration once, else None (unchanged)
            new, self._tls_next = self._tls_next, None
            return new

    def drain(self, delay: float, grace: float) -> None:
        """NOT_SERVING first, ``delay`` seconds for balancers to see it (calls are still answered), then
        :meth:`stop` with ``grace``."""
        self._serving.clear()
        self.health.enter_graceful_shutdown()
        self._drain_cut.wait(delay)
        self.stop(grace)

    def stop(self, grace: float = 30.0) -> None:
        """Stop taking calls, give those in flight ``grace`` seconds, then stop the search workers (a second
        call, with a shorter grace, cuts the first one's short)."""
        self._serving.clear()
        self.health.enter_graceful_shutdown()
        self._drain_cut.set()
        self.grpc.stop(grace).wait()
        with self._closing:
            first, self._closed = not self._closed, True
        if not first:  # another stop closes the rest: wait for it, so that the process exits after it
            self._stopped.wait(60)
            return
        try:
            self.guard.close()
            self.health_pool.shutdown(wait=False)
            self.service.close()
            if self.metrics_http is not None:
                self.metrics_http.shutdown()
                self.metrics_http.server_close()
        finally:
            self._stopped.set()

    def wait(self) -> None:
        """Block until the server has stopped."""
        self.grpc.wait_for_termination()


def serve(args: argparse.Namespace) -> int:
    """``ofa serve`` with the flags of :func:`add_arguments` parsed: serve until SIGTERM or SIGINT."""
    return run(config_of(args))


def run(config: ServeConfig) -> int:
    """Serve the artifacts of ``config`` until SIGTERM or SIGINT, then drain (:mod:`.lifecycle`); returns 0."""
    configure_logging(config.log_format)  # this process's log, with times (replacing the ofa command's)
    interrupt_start()  # a signal from here until Signals takes over: a clean exit, no worker left behind
    if config.stop_with_parent:
        stop_with_parent()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)  # this process's own setting: it serves until it exits
    tls = read_tls(config.tls_cert, config.tls_key) if config.tls_cert else None
    tokens = Tokens.from_file(config.token_file) if config.token_file else None
    if tokens and not tls and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("a bearer token over plain text on %s: use --tls-cert/--tls-key", config.host)
    registry = Registry(list(config.artifacts), config.targets_dir, list(config.names), max_targets=config.max_targets,
                        table_bytes=config.max_table_bytes)
    server = Server(registry, config, tokens, tls)
    signals = Signals(config, tokens)  # before the first health answer: a SIGTERM from then on drains
    server.start()
    metrics = f"; metrics on http://{config.metrics_host}:{server.metrics_port}/metrics" if server.metrics else ""
    print(f"ofa serve: listening on {config.host}:{server.port} ({'TLS' if tls else 'plaintext'}"
          f"{', token required' if tokens else ''}); supernets: {', '.join(sorted(registry.supernets))}{metrics}",
          flush=True)
    if config.port_file:  # how a parent learns an OS-chosen port: a value, not a log line to match
        atomic_write_text(Path(config.port_file), json.dumps(
            {"host": config.host, "port": server.port, "metrics_port": server.metrics_port, "pid": os.getpid()}))
    signals.serve(server)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ofa_server.main``: the same as ``ofa serve``."""
    p = argparse.ArgumentParser(prog="ofa serve", description="Serve supernet artifacts over gRPC.")
    add_arguments(p)
    return serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
