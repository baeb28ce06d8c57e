"""Client of the Once-for-All supernet server (installed as ``ofa_client``; no torch needed).

    from ofa_client import Client
    with Client("127.0.0.1:50051") as c:
        best = c.search("my-phone", max_latency_ms=5.0)
        c.fetch(best, "onnx").save("model.onnx")
"""
from .client import FORMATS, Client, SubnetInfo, Weights
from .errors import (AlreadyExists, ClientError, DeadlineExceeded, Infeasible, IntegrityError, InvalidArgument,
                     NotFound, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable)

__all__ = ["AlreadyExists", "Client", "ClientError", "DeadlineExceeded", "FORMATS", "Infeasible", "IntegrityError",
           "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "SubnetInfo", "Unauthenticated",
           "Unavailable", "Weights"]
