"""The client's typed errors: one class per gRPC status a caller may act on, each with the
``ofa-client`` exit code it maps to (see ``cli.py``), and the status → error mapping.

Needs only grpcio.
"""
from __future__ import annotations

import grpc

__all__ = ["AlreadyExists", "ClientError", "DeadlineExceeded", "Infeasible", "IntegrityError", "InvalidArgument",
           "NotFound", "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable", "VersionMismatch", "error_from_rpc"]


class ClientError(Exception):
    """A call that did not succeed; ``code`` is the gRPC status name, ``details`` the server's message."""

    exit_code = 1

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class InvalidArgument(ClientError):
    """INVALID_ARGUMENT: the server refused a field of the request (the message names it)."""

    exit_code = 2


class Infeasible(ClientError):
    """FAILED_PRECONDITION: no subnet meets the constraints (the message gives the smallest achievable
    value), the supernet is served without an accuracy predictor, or the server lacks the package a
    format's writer needs (the message says which)."""
    exit_code = 3


class NotFound(ClientError):
    """NOT_FOUND: no such supernet, target or subnet on this server."""

    exit_code = 4


class AlreadyExists(ClientError):
    """ALREADY_EXISTS: a target of that name is registered (pass ``replace=True``)."""

    exit_code = 4


class Unavailable(ClientError):
    """UNAVAILABLE: the server is starting, stopping or replacing a worker: retry."""

    exit_code = 5


class ResourceExhausted(ClientError):
    """The server is at its limit of concurrent searches: retry with backoff."""
    exit_code = 5


class DeadlineExceeded(ClientError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""

    exit_code = 5


class Unauthenticated(ClientError):
    """UNAUTHENTICATED: no token, or one the server does not accept."""

    exit_code = 6


class PermissionDenied(ClientError):
    """The token is valid but may not do this (replace or delete another client's target)."""
    exit_code = 6


class IntegrityError(ClientError):
    """Downloaded bytes that do not match the header's size or sha256."""
    exit_code = 7


class VersionMismatch(ClientError):
    """The server speaks an API version this client cannot use (another major, or an older minor)."""
    exit_code = 8


class SupernetMismatch(ClientError):
    """Fetched weights of another supernet than the one the search ran on (same name, another artifact:
    a replica of another version, during a rolling update); the bytes were not returned."""
    exit_code = 9


_BY_CODE = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.FAILED_PRECONDITION: Infeasible,
            grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
            grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
            grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded, grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
            grpc.StatusCode.PERMISSION_DENIED: PermissionDenied}


def error_from_rpc(e: grpc.RpcError) -> ClientError:
    """The typed error for a failed call: its status code's class (``ClientError`` for the others)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, ClientError)(code.name, e.details() if hasattr(e, "details") else str(e))
