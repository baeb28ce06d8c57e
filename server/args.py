"""The options of ``ofa serve`` (argparse only, so building the ``ofa`` parser stays cheap)."""
from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", action="append", required=True,
                   help="a supernet artifact folder (repeat for several); served under its folder name")
    p.add_argument("--name", action="append", help="serve the n-th artifact under this name instead")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port (default 50051; 0: any free port, printed)")
    p.add_argument("--targets-dir", help="folder where registered targets are kept (shared by replicas); "
                   "without it registrations last until the server stops")
    p.add_argument("--max-targets", type=int, default=64,
                   help="registered targets kept per supernet before RESOURCE_EXHAUSTED (default 64; replacing "
                   "one is always allowed)")
    p.add_argument("--max-table-bytes", type=int, default=1 << 20,
                   help="bytes a registered table may have as stored (default 1 MiB; a profiled table is ~16 KB)")
    p.add_argument("--workers", type=int, default=16,
                   help="RPC threads for everything but weight streams and health watches (default 16)")
    p.add_argument("--max-streams", type=int, default=32,
                   help="weight streams sent at once, on threads of their own, before RESOURCE_EXHAUSTED; when all "
                   "are taken the one whose client has taken no data for --stream-preempt-s is cancelled to make "
                   "way (default 32)")
    p.add_argument("--max-streams-per-peer", type=int, default=4,
                   help="weight streams one client connection may have open at once (default 4)")
    p.add_argument("--stream-preempt-s", type=float, default=5.0,
                   help="a stream stalled this long gives its slot to a new one when all are taken (default 5)")
    p.add_argument("--stream-stall-s", type=float, default=30.0,
                   help="a weight stream whose client takes no data for this long is cancelled, freeing its "
                   "thread (default 30)")
    p.add_argument("--max-connection-age-s", type=float, default=1800.0,
                   help="connections are closed after this long (plus 5 minutes to finish their calls); "
                   "keepalive pings find dead peers (default 1800)")
    p.add_argument("--max-searches", type=int, default=2,
                   help="concurrent searches (and, apart, weight builds) before RESOURCE_EXHAUSTED (default 2)")
    p.add_argument("--max-per-peer", type=int, default=0,
                   help="searches (and, apart, weight builds) one client connection may run at once (default 0: "
                   "half of --max-searches, at least 1)")
    p.add_argument("--max-search-work", type=int, default=5_000_000,
                   help="population x generations (x points for a front) one request may ask for (default "
                   "5,000,000: ~100 default searches)")
    p.add_argument("--max-search-seconds", type=float, default=300.0,
                   help="a search or front still running after this long is stopped, its worker replaced and "
                   "the call answered UNAVAILABLE (default 300; a call's own deadline stops it sooner)")
    p.add_argument("--max-message-chars", type=int, default=1000,
                   help="status messages and their log lines are cut to this many characters, saying so "
                   "(they echo client input; default 1000, at least 100)")
    p.add_argument("--max-health-watches", type=int, default=16,
                   help="grpc.health.v1 Watch streams open at once (each holds a thread of its own) before "
                   "RESOURCE_EXHAUSTED (health needs no token; default 16)")
    p.add_argument("--cache-mb", type=int, default=512, help="bytes of built weights kept, in MiB (default 512)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--token-file", help="bearer tokens every call but health must carry: one per line, 'TOKEN' or "
                   "'NAME TOKEN' (a client each; a registered target can be replaced or deleted only by the "
                   "client that registered it)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight calls get on SIGTERM (default 30)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for weight builds (0: default)")
