"""Bearer tokens: who may call, and which client a call is from (the owner of what it registers)."""
from __future__ import annotations

import hmac
from concurrent import futures
from pathlib import Path

import grpc

__all__ = ["OPEN_METHODS", "TokenAuth", "Tokens"]

OPEN_METHODS = ("/grpc.health.v1.Health/",)  # load balancers probe health without a token


class Tokens:
    """``--token-file``: one token per line, either ``TOKEN`` (the client named "default") or ``NAME TOKEN``;
    blank lines and ``#`` comments are skipped. Each client owns the targets it registers."""

    def __init__(self, by_name: dict[str, str]) -> None:
        self._tokens = [(name, f"Bearer {token}".encode()) for name, token in by_name.items()]

    def __len__(self) -> int:
        return len(self._tokens)

    def replace_with(self, other: "Tokens") -> None:
        """Take ``other``'s tokens (SIGHUP): the next call is checked against them (one assignment, atomic)."""
        self._tokens = list(other._tokens)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokens":
        by_name: dict[str, str] = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) > 2:
                raise ValueError(f"--token-file {path}, line {n}: expected 'TOKEN' or 'NAME TOKEN'")
            name, token = parts if len(parts) == 2 else ("default", parts[0])
            if name in by_name or token in by_name.values():
                raise ValueError(f"--token-file {path}, line {n}: client {name!r} or its token is given twice")
            by_name[name] = token
        if not by_name:
            raise ValueError(f"--token-file {path} holds no token")
        return cls(by_name)

    def client_of(self, metadata) -> str | None:
        """The name of the client whose token the call's metadata carries, or None."""
        given = dict(metadata or ()).get("authorization", "")
        if not isinstance(given, str):
            return None
        given_b = given.encode()
        found = None
        for name, want in self._tokens:  # every token compared, in constant time each
            if hmac.compare_digest(given_b, want):
                found = name
        return found


class TokenAuth(grpc.ServerInterceptor):
    """Every call but health checks must carry ``authorization: Bearer <token>`` of a known client."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required "
                          "(metadata 'authorization: Bearer <token>')")

        # a streaming-request handler (a refusal sends only a status: the same bytes on the wire for every kind
        # of method): a call is refused without waiting for its request, which a client may never send, on a
        # pool of its own, so that a flood of calls without a token does not queue before the others
        self.pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="ofa-unauthenticated")

        def refuse(requests, context):
            deny(None, context)

        refuse.experimental_thread_pool = self.pool
        self._deny = grpc.stream_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS) or self._tokens.client_of(details.invocation_metadata) is not None:
            return continuation(details)
        return self._deny
