"""Client of the Once-for-All supernet server: the distribution ``ofa-client`` (``pip install ./client``),
imported as ``ofa_client``; grpcio and protobuf only.

    from ofa_client import Client
    with Client("127.0.0.1:50051") as c:
        best = c.search("my-phone", max_latency_ms=5.0)
        c.fetch(best, "onnx").save("model.onnx")
"""
from .client import FORMATS, Client, SubnetInfo, Weights
from .errors import (AlreadyExists, ClientError, DeadlineExceeded, Infeasible, IntegrityError, InvalidArgument,
                     NotFound, PermissionDenied, ResourceExhausted, SupernetMismatch, Unauthenticated, Unavailable,
                     VersionMismatch)
from .v1 import API_VERSION

__all__ = ["API_VERSION", "AlreadyExists", "Client", "ClientError", "DeadlineExceeded", "FORMATS", "Infeasible",
           "IntegrityError", "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "SubnetInfo",
           "SupernetMismatch", "Unauthenticated", "Unavailable", "VersionMismatch", "Weights"]
