"""What the client refuses before any call: values grpc or protobuf would take and then fail every call with, or
answer with a message that names no field (standard library only)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["check_address", "check_connection", "check_ints"]


def check_address(address: Any) -> str:
    """``address`` if gRPC can dial it as meant: ``HOST:PORT`` (``[IPv6]:PORT``), or ``ipv4:``/``ipv6:`` with
    comma-separated ``HOST:PORT``, each port in 1..65535 (grpc wraps 99999 to 34463 and dials that), or another
    of gRPC's schemes (``dns:``, ``unix:``) as given; a ValueError says the form otherwise."""
    form = "HOST:PORT (a port in 1..65535), or ipv4:HOST:PORT,HOST:PORT for replicas"
    if not isinstance(address, str) or not 0 < len(address) <= 1000 or not address.isprintable() \
            or any(c.isspace() for c in address):
        raise ValueError(f"address must be {form}; got {str(address)[:80]!r}")
    scheme, _, rest = address.partition(":")
    if scheme in ("dns", "unix", "unix-abstract", "vsock", "xds") and rest:
        return address
    for hostport in (rest.split(",") if scheme in ("ipv4", "ipv6") else [address]):
        host, _, port = hostport.rpartition(":")
        if not host or "/" in host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address must be {form}; got {address[:80]!r}")
    return address


def check_connection(timeout: Any, token: Any, tls: Any) -> bytes | None:
    """Refuse what grpc would take and then fail every call with (DEADLINE_EXCEEDED at once for a timeout of 0 or
    nan, INTERNAL for a token no HTTP header can carry, plaintext for an empty certificate path); the root
    certificates of a ``tls`` path."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and 0 < timeout <= 1e6):
        raise ValueError(f"timeout must be seconds in (0, 1e6], got {str(timeout)[:40]!r}")
    if token is not None and (not isinstance(token, str) or not token
                              or not all(33 <= ord(c) <= 126 for c in token) or len(token) > 4096):
        raise ValueError("token must be 1-4096 printable ASCII characters without spaces (it travels in an "
                         "HTTP header)")
    if isinstance(tls, bool):
        return None
    if not isinstance(tls, (str, Path)) or not str(tls):
        raise ValueError(f"tls must be True, False or the path of a PEM file of root certificates, got {tls!r}"[:200])
    roots = Path(tls).read_bytes()
    if b"-----BEGIN CERTIFICATE-----" not in roots:
        raise ValueError(f"tls: {str(tls)[:200]} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return roots


# the request fields an int from a caller fills, and what protobuf takes ("Value out of range: -1" named none)
_INT_RANGES = {"seed": (0, 2**64 - 1), "max_macs": (0, 2**63 - 1), "max_params": (0, 2**63 - 1),
               "population": (0, 2**31 - 1), "generations": (0, 2**31 - 1), "points": (0, 2**31 - 1),
               "resolution": (0, 2**31 - 1)}


def check_ints(**values: Any) -> None:
    """A ValueError naming the first of ``values`` (None: unset) that its request field cannot hold."""
    for name, v in values.items():
        lo, hi = _INT_RANGES[name]
        for x in (v if name == "resolution" else [v] if v is not None else []):
            if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
                raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {str(x)[:40]!r}")
