"""``ofa serve`` as a command of the ``ofa`` CLI (entry point ``ofa.commands: serve``): cheap to import."""
from __future__ import annotations

import argparse

from ofa.cli.common import Command

from .args import add_arguments

__all__ = ["COMMAND"]


def _serve(args: argparse.Namespace) -> int:
    from .main import serve  # grpc, torch and the artifacts load only for this command

    return serve(args)


COMMAND = Command("serve", "serve artifacts over gRPC (search, Pareto fronts, weights)", add_arguments, _serve,
                  description="Serve one or more supernet artifacts over gRPC (ofa.v1.SubnetService, health and "
                  "reflection). SIGTERM drains it (NOT_SERVING, then in-flight calls finish); SIGHUP re-reads "
                  "tokens and TLS files.")
