"""Client of the Once-for-All supernet server: the distribution ``ofa-client`` (``pip install ./client``),
imported as ``ofa_client``; grpcio and protobuf only.

    from ofa_client import Client
    with Client("127.0.0.1:50051") as c:
        best = c.search("my-phone", max_latency_ms=5.0)
        c.fetch(best, "onnx").save("model.onnx")
"""
import importlib
from typing import Any

# Imported on first use (PEP 562): the client's names need grpcio, while the timing protocol's modules
# (ofa_client.timing, .latency_model, .profile, the worker _timer) need numpy only, and ``ofa profile`` on a
# device without grpcio imports them through this package.
_FROM = {"FORMATS": "client", "Client": "client", "SubnetInfo": "client", "Weights": "client", "API_VERSION": "v1",
         **{name: "errors" for name in ("AlreadyExists", "ClientError", "DeadlineExceeded", "Infeasible",
                                        "IntegrityError", "InvalidArgument", "NotFound", "PermissionDenied",
                                        "ResourceExhausted", "SupernetMismatch", "Unauthenticated", "Unavailable",
                                        "VersionMismatch")}}

__all__ = ["API_VERSION", "AlreadyExists", "Client", "ClientError", "DeadlineExceeded", "FORMATS", "Infeasible",
           "IntegrityError", "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "SubnetInfo",
           "SupernetMismatch", "Unauthenticated", "Unavailable", "VersionMismatch", "Weights"]


def __getattr__(name: str) -> Any:
    if name in _FROM:
        return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
