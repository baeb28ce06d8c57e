"""How an RPC's outcome becomes a status: a client's mistake a status with a message (and one INFO log
line, no traceback); only a server bug logs a traceback, as INTERNAL, and the server goes on."""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import time
from typing import Any, Callable, Iterator

import grpc

from ofa.calibrate import CalibrationCancelled
from ofa.export import ExportKilled
from ofa.search import Infeasible, SearchCancelled, UnknownTarget

from . import convert as cv
from .kits import Closing
from .searcher import WorkerLost
from .slots import CallGone

__all__ = ["answering", "handled"]

log = logging.getLogger("ofa_server")


def _status(e: Exception, context: grpc.ServicerContext, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, cv.RequestError):
        return e.code, e.message
    if isinstance(e, Infeasible):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, UnknownTarget):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, (WorkerLost, TimeoutError, ExportKilled, Closing)):  # a worker died or hung, a build ran too
        # long, had its process killed or was stopped by a server that is stopping: a retry can succeed
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a build's files (a kit, an export)
        log.warning("%s: the disk is full: %s", method, e)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server's disk is full; retry later"
    if isinstance(e, (SearchCancelled, CalibrationCancelled, CallGone)):
        expired = context.time_remaining() is not None and context.time_remaining() <= 0
        return ((grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed") if expired else
                (grpc.StatusCode.CANCELLED, "the request was cancelled"))
    log.exception("%s failed", method)  # a bug of ours: keep serving, say so, keep the traceback for us
    return grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has details"


@contextlib.contextmanager
def answering(context: grpc.ServicerContext, method: str, max_chars: int) -> Iterator[None]:
    """Run the block; an exception from it ends the call with its status (never kills the server)."""
    t0 = time.perf_counter()
    try:
        yield
    except Exception as e:  # noqa: BLE001 (each kind gets its status in _status; a bug is INTERNAL)
        code, msg = _status(e, context, method)
        msg = cv.bounded(msg, max_chars)
        log.info("%s -> %s (%.1f ms): %s", method, code.name, 1000 * (time.perf_counter() - t0), msg)
        context.abort(code, msg)


def handled(method: Callable) -> Callable:
    """A unary RPC run inside :func:`answering` (applied where the RPC is defined)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        with answering(context, method.__name__, self.max_message_chars):
            return method(self, request, context)

    return wrapper
