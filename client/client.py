"""The client library: search, Pareto fronts, verified weight downloads, targets.

Needs only grpcio and protobuf (and the standard library); ``load_module`` imports
torch when called (and the server project's ``ofa`` package for safetensors weights).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import grpc

from .errors import (AlreadyExists, ClientError, DeadlineExceeded, Infeasible, IntegrityError, InvalidArgument,
                     NotFound, PermissionDenied, ResourceExhausted, SupernetMismatch, Unauthenticated, Unavailable,
                     VersionMismatch, error_from_rpc)
from .v1 import API_VERSION
from .v1 import subnet_service_pb2 as pb

# The oldest server API this client works with: the same major, and a minor whose requests carry every field
# this client sends (1.1 added answers only, `fine_tuned`, which a 1.0 server leaves false).
OLDEST_SERVER_API = "1.0"
from .v1 import subnet_service_pb2_grpc as pb_grpc
from .checks import check_address, check_connection, check_ints
from .values import (WEIGHTS_FORMATS, SubnetInfo, Weights, arch_to_dict, arch_to_pb, format_name,
                     reference_timings_of)

__all__ = ["AlreadyExists", "Client", "ClientError", "DeadlineExceeded", "Infeasible", "IntegrityError",
           "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "SubnetInfo", "Unauthenticated",
           "Unavailable", "VersionMismatch", "Weights", "DEFAULT_FORMAT", "FORMATS", "reference_timings_of"]

FORMATS = WEIGHTS_FORMATS  # {name: the API's WeightsFormat value}
DEFAULT_FORMAT = format_name(pb.WEIGHTS_FORMAT_SAFETENSORS)  # the weights with the arch in their metadata


# ---- the client --------------------------------------------------------------------
def _digest_of(subnet: Any) -> str:
    """The supernet digest a search result carries ("" for an id, an arch, or a result of API < 1.3)."""
    found = subnet.supernet_digest if isinstance(subnet, SubnetInfo) else \
        subnet.get("supernet_digest") if isinstance(subnet, Mapping) else ""
    return found if isinstance(found, str) else ""


def unpack_kit(data: bytes, folder: str | Path) -> Path:
    """A kit's tar unpacked into ``folder`` (made if missing): regular files inside it only, checked before any
    is written (also on Pythons whose tarfile has no extraction filters); anything else is DATA_LOSS."""
    import tarfile

    folder = Path(folder)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise IntegrityError("DATA_LOSS", f"the kit holds {m.name[:80]!r}, not a file inside it")
        folder.mkdir(parents=True, exist_ok=True)
        tar.extractall(folder)
    return folder


class Client:
    """A connection to an ``ofa serve`` server, or to several replicas: ``address`` in gRPC's name syntax,
    e.g. ``ipv4:10.0.0.5:50051,10.0.0.6:50051``, spreads the calls round robin over the ones that are up.

    ``tls``: False (plaintext), True (TLS with the system's roots) or a PEM file of root
    certificates. ``token``: the bearer token, if the server requires one. ``retries``: how
    many times a call answered UNAVAILABLE (a server replacing a dead search worker, a replica
    stopping) is sent again, after 0.5 s, 1 s, ...; a download is fetched again whole; RegisterTarget and
    DeleteTarget are never re-sent. ``timeout``: seconds per call. A malformed address, timeout, token or
    certificate file is a ValueError here, not a failure of every call. A download
    whose header announces more than ``max_download_bytes`` (default 1 GiB), or describes
    another subnet, format or arch than asked for, is refused before its bytes are kept.
    """

    RETRY_DELAY_S = 0.5
    API_VERSION = API_VERSION  # "MAJOR.MINOR" this client speaks; a server's is checked before the first call

    def __init__(self, address: str = "127.0.0.1:50051", token: str | None = None, tls: bool | str = False,
                 timeout: float = 60.0, supernet: str = "", retries: int = 1,
                 max_download_bytes: int = 1 << 30) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise ValueError(f"retries must be an integer in 0..10, got {retries!r}")
        roots = check_connection(timeout, token, tls)
        check_address(address)
        # a connection of its own: grpc would share one among every channel of a process with the same
        # options, and the server's per-connection limits (--max-per-peer) would then count them as one client
        options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.use_local_subchannel_pool", 1)]
        if "," in address:  # several replicas (``ipv4:HOST:P1,HOST:P2``): spread the calls, skip one that is down
            options.append(("grpc.lb_policy_name", "round_robin"))
        if tls:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self._stub = pb_grpc.SubnetServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout, self.supernet, self.address, self.retries = timeout, supernet, address, retries
        self.max_download_bytes = max_download_bytes
        self.server_api_version: str | None = None  # known after the first call

    def close(self) -> None:
        """Close the channel (a ``with Client(...)`` block does it on exit)."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        if method != "ListSupernets":
            self._check_version(timeout)
        resp = self._send(method, request, timeout)
        if method == "ListSupernets":
            self._accept_version(resp.api_version or "1.0")  # servers older than the field speak 1.0
        return resp

    def _check_version(self, timeout: float | None = None) -> None:
        """Once per client, before its first call: ask which API version the server speaks (ListSupernets)."""
        if self.server_api_version is None:
            self._call("ListSupernets", pb.ListSupernetsRequest(), timeout)

    def _accept_version(self, server: str) -> None:
        """Refuse a server whose API is another major version, or a minor older than :data:`OLDEST_SERVER_API`
        (one that would silently ignore request fields this client sends)."""
        try:
            major, minor = (int(x) for x in server.split("."))
        except ValueError:
            raise VersionMismatch("VERSION", f"the server reports API version {server[:40]!r}, not MAJOR.MINOR") \
                from None
        oldest = tuple(int(x) for x in OLDEST_SERVER_API.split("."))
        if major != oldest[0] or minor < oldest[1]:
            raise VersionMismatch("VERSION", f"the server at {self.address} speaks API {server}; this ofa-client "
                                  f"speaks {API_VERSION} and needs a server of API {OLDEST_SERVER_API} or a later "
                                  f"{oldest[0]}.x: install the ofa-client of the server's release (pip install ./client "
                                  "from its checkout)")
        self.server_api_version = server

    def _send(self, method: str, request: Any, timeout: float | None) -> Any:
        def once() -> Any:
            try:
                return getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                raise error_from_rpc(e) from None

        return self._retrying(once, 0 if method in ("RegisterTarget", "DeleteTarget") else self.retries)

    def _retrying(self, once: Any, retries: int) -> Any:
        """``once()``, called again (after 0.5 s, 1 s, ...) up to ``retries`` times while it raises Unavailable."""
        for attempt in range(retries + 1):
            try:
                return once()
            except Unavailable:
                if attempt == retries:
                    raise
            time.sleep(self.RETRY_DELAY_S * (attempt + 1))
        raise AssertionError("unreachable")

    @staticmethod
    def _constraints(max_latency_ms, max_macs, max_params, resolutions, min_accuracy) -> pb.Constraints:
        check_ints(max_macs=max_macs, max_params=max_params, resolution=list(resolutions or ()))
        c = pb.Constraints(resolutions=list(resolutions or ()))
        for name, value in (("max_latency_ms", max_latency_ms), ("max_macs", max_macs),
                            ("max_params", max_params), ("min_accuracy", min_accuracy)):
            if value is not None:
                setattr(c, name, value)
        return c

    def supernets(self) -> list[dict[str, Any]]:
        """What the server holds: each supernet's name, digest, space, data and targets."""
        from google.protobuf.json_format import MessageToDict

        resp = self._call("ListSupernets", pb.ListSupernetsRequest())
        return [MessageToDict(s, preserving_proto_field_name=True) for s in resp.supernets]

    def targets(self, supernet: str | None = None) -> list[dict[str, Any]]:
        """The hardware targets of a supernet: the table's machine, fit quality, speed and references."""
        from google.protobuf.json_format import MessageToDict

        resp = self._call("ListTargets", pb.ListTargetsRequest(supernet=supernet or self.supernet))
        return [MessageToDict(t, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                for t in resp.targets]

    def register_target(self, table: Mapping[str, Any] | str | Path, replace: bool = False,
                        supernet: str | None = None) -> dict[str, Any]:
        """Upload a latency table (a dict, JSON text, or the path of a JSON file made by ``ofa profile``)."""
        from google.protobuf.json_format import MessageToDict

        if isinstance(table, Path) or (isinstance(table, str) and not table.lstrip().startswith("{")):
            text = Path(table).read_text()
        elif isinstance(table, str):
            text = table
        else:
            text = json.dumps(table)
        resp = self._call("RegisterTarget", pb.RegisterTargetRequest(supernet=supernet or self.supernet,
                                                                     table_json=text, replace=replace))
        return MessageToDict(resp, preserving_proto_field_name=True)

    def delete_target(self, name: str, supernet: str | None = None) -> str:
        """Remove a registered target (not one shipped in the artifact); returns its name."""
        resp = self._call("DeleteTarget", pb.DeleteTargetRequest(supernet=supernet or self.supernet, target=name))
        return resp.target

    def search(self, target: str | None = None, *, max_latency_ms: float | None = None, max_macs: int | None = None,
               max_params: int | None = None, resolutions: Sequence[int] = (), min_accuracy: float | None = None,
               seed: int = 0, population: int = 0, generations: int = 0, supernet: str | None = None,
               timeout: float | None = None, reference_timings: Any = None) -> SubnetInfo:
        """The most accurate subnet meeting the constraints. ``reference_timings`` (see
        :func:`reference_timings_of`): the target's references timed on the device just now, so that
        ``max_latency_ms`` holds at the device's speed today."""
        check_ints(seed=seed, population=population, generations=generations)
        req = pb.SearchSubnetRequest(
            supernet=supernet or self.supernet, target=target or "", seed=seed,
            constraints=self._constraints(max_latency_ms, max_macs, max_params, resolutions, min_accuracy),
            options=pb.SearchOptions(population=population, generations=generations),
            reference_timings=reference_timings_of(reference_timings))
        return SubnetInfo.from_pb(self._call("SearchSubnet", req, timeout))

    def pareto(self, target: str | None = None, points: int = 10, *, max_latency_ms: float | None = None,
               max_macs: int | None = None, max_params: int | None = None, resolutions: Sequence[int] = (),
               seed: int = 0, population: int = 0, generations: int = 0, supernet: str | None = None,
               timeout: float | None = None, reference_timings: Any = None) -> list[SubnetInfo]:
        """Up to ``points`` subnets on the accuracy–latency front (accuracy–MACs without a target), by cost."""
        check_ints(seed=seed, population=population, generations=generations, points=points)
        req = pb.GetParetoFrontRequest(
            supernet=supernet or self.supernet, target=target or "", points=points, seed=seed,
            constraints=self._constraints(max_latency_ms, max_macs, max_params, resolutions, None),
            options=pb.SearchOptions(population=population, generations=generations),
            reference_timings=reference_timings_of(reference_timings))
        return [SubnetInfo.from_pb(p) for p in self._call("GetParetoFront", req, timeout).points]

    def fetch(self, subnet: str | SubnetInfo | Mapping[str, Any], format: str = DEFAULT_FORMAT,
              supernet: str | None = None, timeout: float | None = None) -> Weights:
        """Download a subnet's weights, verified by sha256.

        ``subnet``: an id (known to the server that found it), a search result, its
        ``to_dict()`` (what ``ofa-client search --json`` prints), or an arch dict. All but
        the id carry the arch, so any replica can answer, also after a restart.
        """
        if format not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
        req, arch = self._weights_request(subnet, FORMATS[format], supernet)
        self._check_version(timeout)
        header, data = self._verified(self._stub.GetSubnetWeights, req, lambda h: self._check_header(h, req, arch),
                                      timeout)
        searched_on = _digest_of(subnet)
        if searched_on and header.supernet_digest != searched_on:
            raise SupernetMismatch("SUPERNET_MISMATCH", f"the weights came from supernet {header.supernet_digest[:16]}…, "
                                   f"but the search ran on {searched_on[:16]}… (a server of another artifact version "
                                   f"under the same name): search again on the server that answers now")
        return Weights(data, format, header.sha256, header.subnet_id, arch_to_dict(header.arch),
                       tuple(header.input_shape), tuple(header.mean), tuple(header.std), header.supernet_digest,
                       header.fine_tuned)

    def _weights_request(self, subnet: str | SubnetInfo | Mapping[str, Any], format: int,
                         supernet: str | None) -> tuple[pb.GetSubnetWeightsRequest, Any]:
        """The request for ``subnet`` (see :meth:`fetch`), and the arch it names (None for a bare id)."""
        if isinstance(subnet, SubnetInfo):
            subnet = subnet.to_dict()
        if isinstance(subnet, str):
            subnet_id, found_on, arch = subnet, "", None
        elif isinstance(subnet, Mapping) and "arch" in subnet:  # a search result as a dict
            subnet_id, found_on, arch = subnet.get("id"), subnet.get("supernet"), subnet["arch"]
        else:
            subnet_id, found_on, arch = "", "", subnet
        req = pb.GetSubnetWeightsRequest(format=format, supernet=supernet or (
            found_on if isinstance(found_on, str) and found_on else self.supernet))
        if isinstance(subnet_id, str) and subnet_id:
            req.subnet_id = subnet_id
        if arch is not None:
            req.arch.CopyFrom(arch_to_pb(arch))
        return req, arch

    def _verified(self, call: Any, req: Any, check: Any, timeout: float | None) -> tuple[Any, bytes]:
        """:meth:`_download`, fetched again whole while a stream is cut by UNAVAILABLE (a replica going down), and
        its bytes checked against the header's size and sha256."""
        header, data = self._retrying(lambda: self._download(call, req, check, timeout), self.retries)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != header.total_bytes or digest != header.sha256:
            raise IntegrityError("DATA_LOSS", f"received {len(data)} bytes with sha256 {digest[:16]}…, the header "
                                 f"announced {header.total_bytes} bytes with sha256 {header.sha256[:16]}…")
        return header, data

    def _download(self, call: Any, req: Any, check: Any, timeout: float | None) -> tuple[Any, bytes]:
        """The header and the bytes of one stream of ``call`` (a header, then chunks); ``check`` sees the header
        before any byte is kept; a header or chunk out of place is refused at once."""
        stream = None
        try:
            stream = call(req, timeout=timeout or self.timeout, metadata=self._metadata)
            header, chunks, size = None, [], 0
            for msg in stream:
                if msg.HasField("header"):
                    if header is not None:
                        raise IntegrityError("DATA_LOSS", "the stream sent a second header")
                    header = msg.header
                    check(header)
                    continue
                if header is None:
                    raise IntegrityError("DATA_LOSS", "the stream sent data before its header")
                size += len(msg.chunk)
                if size > header.total_bytes:
                    raise IntegrityError("DATA_LOSS", f"the stream sent more than the {header.total_bytes} "
                                         "bytes its header announced")
                chunks.append(msg.chunk)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        except BaseException:  # a header refused: the stream is ended now, not when it is collected
            if stream is not None:
                stream.cancel()
            raise
        if header is None:
            raise IntegrityError("DATA_LOSS", "the stream ended without a header")
        return header, b"".join(chunks)

    def _check_size(self, header: Any) -> None:
        if not 0 <= header.total_bytes <= self.max_download_bytes:
            raise IntegrityError("DATA_LOSS", f"the header announces {header.total_bytes} bytes; this client accepts "
                                 f"0..{self.max_download_bytes} (max_download_bytes)")

    def _check_header(self, header: pb.WeightsHeader, req: pb.GetSubnetWeightsRequest, arch: Any) -> None:
        """A header must describe what was asked for, at a size this client accepts, before any byte is kept."""
        self._check_size(header)
        if header.format != req.format:
            raise IntegrityError("DATA_LOSS", f"asked for format {req.format}, the header says {header.format}")
        if req.subnet_id and header.subnet_id != req.subnet_id:
            raise IntegrityError("DATA_LOSS", f"asked for subnet {req.subnet_id}, the header says "
                                 f"{header.subnet_id[:40]!r}")
        if arch is not None and arch_to_dict(header.arch) != arch_to_dict(req.arch):
            raise IntegrityError("DATA_LOSS", "the header's arch is not the arch asked for")

    def fetch_kit(self, folder: str | Path, precision: str = "fp32", supernet: str | None = None,
                  timeout: float | None = None, runtime: str = "onnxruntime") -> Path:
        """The server's profiling kit of its supernet's space (``GetProfileKit``, API 1.4; ``runtime``, which
        picks the quantizer of an int8 kit, 1.5), verified by sha256 and unpacked into ``folder`` (made if
        missing); time it with :func:`ofa_client.profile.profile_kit`. The server builds a kit on its first
        request (tens of seconds): give a ``timeout`` that allows it."""
        self._check_version(timeout)
        req = pb.GetProfileKitRequest(supernet=supernet or self.supernet, precision=precision, runtime=runtime)
        _, data = self._verified(self._stub.GetProfileKit, req, self._check_size, timeout)
        return unpack_kit(data, folder)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health status name (``SERVING``, ``NOT_SERVING`` …) from ``grpc.health.v1``.

        The two tiny messages are encoded here, so the client needs no extra package.
        """
        name = service.encode()
        if len(name) > 127:
            raise ValueError("service name too long")
        check = self._channel.unary_unary("/grpc.health.v1.Health/Check",
                                          request_serializer=lambda n: (b"\n" + bytes([len(n)]) + n) if n else b"",
                                          response_deserializer=lambda b: b)
        try:
            raw = check(name, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        status = raw[1] if len(raw) >= 2 and raw[0] == 0x08 else 0  # field 1, varint (values < 128)
        return {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}.get(status, "UNKNOWN")

