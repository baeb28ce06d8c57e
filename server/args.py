"""The options of ``ofa serve``: its flags, and the :class:`ServeConfig` they make (argparse and dataclasses
only, so building the ``ofa`` parser stays cheap)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

from .search_worker import SEARCH_NICENESS

__all__ = ["ServeConfig", "add_arguments", "config_of"]

LOG_FORMATS = ("text", "json")
# flags whose value must be at least 1, in the order they are checked
_AT_LEAST_ONE = ("workers", "max_searches", "cache_mb", "max_search_seconds", "max_health_watches", "max_targets",
                 "max_connection_age_s", "stream_stall_s", "stream_preempt_s", "max_streams", "max_streams_per_peer",
                 "max_search_work", "max_table_bytes")


@dataclass(frozen=True)
class ServeConfig:
    """How ``ofa serve`` runs: one field per flag (``--max-searches`` is ``max_searches``), checked when made."""

    artifacts: tuple[str, ...] = ()  # --artifact, repeated
    names: tuple[str, ...] = ()  # --name, repeated
    host: str = "127.0.0.1"
    port: int = 50051
    targets_dir: str | None = None
    max_targets: int = 64
    max_table_bytes: int = 1 << 20  # a registered table as stored (a real one is ~16 KB), kept parsed by every replica
    workers: int = 16
    max_streams: int = 32
    max_streams_per_peer: int = 4
    stream_preempt_s: float = 5.0
    stream_stall_s: float = 30.0
    max_connection_age_s: float = 1800.0
    max_searches: int = 2
    max_per_peer: int = 0  # 0: half of max_searches, at least 1
    max_search_work: int = 5_000_000  # population x generations (x points): ~100 default searches, ~10 s on 2 cores
    max_search_seconds: float = 300.0
    search_niceness: int = SEARCH_NICENESS  # added to the search workers' nice value
    max_message_chars: int = 1000
    max_health_watches: int = 16
    body_timeout_s: float = 10.0
    cache_mb: int = 512
    tls_cert: str | None = None
    tls_key: str | None = None
    token_file: str | None = None
    grace: float = 30.0
    drain_delay_s: float = 5.0
    stop_with_parent: bool = False  # drain once the process that started this one is gone
    threads: int = 0
    metrics_port: int | None = None  # None: no metrics endpoint
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"
    port_file: str | None = None  # where the port is written once listening (JSON)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.max_message_chars < 100:
            raise ValueError(f"--max-message-chars must be >= 100, got {self.max_message_chars}")
        for name in _AT_LEAST_ONE:  # finite too: grpc overflowed on --max-connection-age-s inf
            if not 1 <= getattr(self, name) <= 1e9:
                raise ValueError(f"--{name.replace('_', '-')} must be in [1, 1e9], got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:  # grpc wraps 99999 to 34463, and -1 to 65535, without a word
            raise ValueError(f"--port must be in 0..65535 (0: any free port), got {self.port}")
        if not 0 <= self.grace <= 3600:
            raise ValueError(f"--grace must be seconds in [0, 3600], got {self.grace}")
        if not 0 <= self.threads <= 1024:
            raise ValueError(f"--threads must be in 0..1024 (0: torch's default), got {self.threads}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {list(LOG_FORMATS)}, got {self.log_format!r}")
        if not 0 <= self.drain_delay_s <= 3600:
            raise ValueError(f"--drain-delay-s must be in [0, 3600], got {self.drain_delay_s}")
        if not 0 < self.body_timeout_s <= 3600:
            raise ValueError(f"--body-timeout-s must be in (0, 3600], got {self.body_timeout_s}")
        if isinstance(self.search_niceness, bool) or not 0 <= self.search_niceness <= 19:
            raise ValueError(f"--search-niceness must be an integer in 0..19, got {self.search_niceness}")
        if self.max_per_peer < 0:
            raise ValueError(f"--max-per-peer must be >= 0 (0: half of --max-searches), got {self.max_per_peer}")
        # checked before the server starts: the file is written once it serves, too late to refuse the flag
        if self.port_file is not None and not os.path.isdir(os.path.dirname(os.path.abspath(self.port_file))):
            raise ValueError(f"--port-file must be in a folder that exists, got {self.port_file[:1000]!r}")

    @property
    def per_peer(self) -> int:
        """Searches (and, apart, weight builds) one client (its token's name, else its address) may run at once."""
        return self.max_per_peer or max(1, self.max_searches // 2)


def config_of(args: argparse.Namespace) -> ServeConfig:
    """The config the parsed flags of :func:`add_arguments` give; a bad value raises ValueError naming its flag."""
    values = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if f.name not in ("artifacts", "names")}
    return ServeConfig(artifacts=tuple(args.artifact), names=tuple(args.name or ()), **values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``ofa serve``, on ``p`` (their defaults are :class:`ServeConfig`'s)."""
    _D = ServeConfig
    p.add_argument("--artifact", action="append", required=True,
                   help="a supernet artifact folder (repeat for several); served under its folder name")
    p.add_argument("--name", action="append", help="serve the n-th artifact under this name instead")
    p.add_argument("--host", default=_D.host, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=_D.port, help="port (default 50051; 0: any free port, printed)")
    p.add_argument("--targets-dir", help="folder where registered targets are kept (shared by replicas); "
                   "without it registrations last until the server stops")
    p.add_argument("--max-targets", type=int, default=_D.max_targets,
                   help="registered targets kept per supernet before RESOURCE_EXHAUSTED (default 64; replacing "
                   "one is always allowed)")
    p.add_argument("--max-table-bytes", type=int, default=_D.max_table_bytes,
                   help="bytes a registered table may have as stored (default 1 MiB; a profiled table is ~16 KB)")
    p.add_argument("--workers", type=int, default=_D.workers,
                   help="RPC threads for everything but weight streams and health watches (default 16)")
    p.add_argument("--max-streams", type=int, default=_D.max_streams,
                   help="weight streams sent at once, on threads of their own, before RESOURCE_EXHAUSTED; when all "
                   "are taken the one whose client has taken no data for --stream-preempt-s is cancelled to make "
                   "way (default 32)")
    p.add_argument("--max-streams-per-peer", type=int, default=_D.max_streams_per_peer,
                   help="weight streams one client (its token's name, else its address) may have open at once "
                   "(default 4)")
    p.add_argument("--stream-preempt-s", type=float, default=_D.stream_preempt_s,
                   help="a stream stalled this long gives its slot to a new one when all are taken (default 5)")
    p.add_argument("--stream-stall-s", type=float, default=_D.stream_stall_s,
                   help="a weight stream whose client takes no data for this long is cancelled, freeing its "
                   "thread (default 30)")
    p.add_argument("--max-connection-age-s", type=float, default=_D.max_connection_age_s,
                   help="connections are closed after this long (plus 5 minutes to finish their calls); "
                   "keepalive pings find dead peers (default 1800)")
    p.add_argument("--max-searches", type=int, default=_D.max_searches,
                   help="concurrent searches (and, apart, weight builds) before RESOURCE_EXHAUSTED (default 2)")
    p.add_argument("--max-per-peer", type=int, default=_D.max_per_peer,
                   help="searches (and, apart, weight builds) one client (its token's name, else its address) may "
                   "run at once (default 0: half of --max-searches, at least 1)")
    p.add_argument("--max-search-work", type=int, default=_D.max_search_work,
                   help="population x generations (x points for a front) one request may ask for (default "
                   "5,000,000: ~100 default searches)")
    p.add_argument("--max-search-seconds", type=float, default=_D.max_search_seconds,
                   help="a search or front still running after this long is stopped, its worker replaced and "
                   "the call answered UNAVAILABLE (default 300; a call's own deadline stops it sooner)")
    p.add_argument("--search-niceness", type=int, default=_D.search_niceness,
                   help="added to the search workers' nice value, 0..19: higher lets weight streams take the "
                   "cores first under saturation, and gives searches far less beside another busy process (at 10: "
                   "7x slower); default 0, docs/service.md has both measured")
    p.add_argument("--max-message-chars", type=int, default=_D.max_message_chars,
                   help="status messages and their log lines are cut to this many characters, saying so "
                   "(they echo client input; default 1000, at least 100)")
    p.add_argument("--max-health-watches", type=int, default=_D.max_health_watches,
                   help="grpc.health.v1 Watch streams open at once (each holds a thread of its own) before "
                   "RESOURCE_EXHAUSTED (health needs no token; default 16)")
    p.add_argument("--cache-mb", type=int, default=_D.cache_mb,
                   help="bytes of built weights kept, in MiB (default 512)")
    p.add_argument("--threads", type=int, default=_D.threads, help="torch CPU threads for weight builds (0: default)")
    _add_lifecycle(p)
    _add_operations(p)


def _add_lifecycle(p: argparse.ArgumentParser) -> None:
    """The flags of who may call, how long a call may keep its request back, and how the server stops."""
    _D = ServeConfig
    p.add_argument("--body-timeout-s", type=float, default=_D.body_timeout_s,
                   help="a call whose request has not arrived this long after its headers is ended UNAVAILABLE; "
                   "calls waiting so are bounded per connection, per client address and in all, the oldest "
                   "ended first, and health has threads of its own (default 10)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--token-file", help="bearer tokens every call but health must carry: one per line, 'TOKEN' or "
                   "'NAME TOKEN' (a client each; a registered target can be replaced or deleted only by the "
                   "client that registered it)")
    p.add_argument("--grace", type=float, default=_D.grace,
                   help="seconds in-flight calls get once a drain stops taking calls (default 30)")
    p.add_argument("--drain-delay-s", type=float, default=_D.drain_delay_s,
                   help="on SIGTERM/SIGINT health turns NOT_SERVING this long before the server stops taking "
                   "calls, so that balancers move traffic away (default 5; a second signal stops at once); "
                   "SIGHUP re-reads --token-file and the TLS files")
    p.add_argument("--stop-with-parent", action="store_true",
                   help="drain and stop once the process that started this one is gone, killed or not (for a "
                   "program that runs a server for a while, as `ofa report` does: none is left behind)")


def _add_operations(p: argparse.ArgumentParser) -> None:
    """The flags for the people who run it: metrics and the log's format."""
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port at /metrics (0: a free "
                   "port, logged; default: no metrics)")
    p.add_argument("--metrics-host", default=ServeConfig.metrics_host,
                   help="address of the metrics endpoint (default 127.0.0.1: this machine only)")
    p.add_argument("--port-file", help="once listening, write {host, port, metrics_port, pid} as JSON to this file "
                   "(atomically): how a parent process learns an OS-chosen port (--port 0)")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=ServeConfig.log_format,
                   help="text (default) or json: one JSON object per line (time, level, rpc, code, ms, peer, "
                   "message), a line per call")
