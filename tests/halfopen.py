"""A hostile gRPC client on raw HTTP/2 (the ``h2`` package): calls whose headers are sent and whose request
body never is. Used by the tests and by ``benchmarks/chaos.py --half-open``; it talks to 127.0.0.1 only."""
from __future__ import annotations

import socket
import threading
from collections import Counter

import h2.config
import h2.connection
import h2.events
import h2.exceptions


class HalfOpen:
    """``connections`` connections to 127.0.0.1:``port``, each opening ``calls`` calls that cycle through
    ``paths`` and never send a body. ``ends`` counts how each call ended: ``status-N`` (grpc-status N in
    trailers), ``reset`` (RST_STREAM), or is missing while it is still open."""

    def __init__(self, port: int, connections: int, calls: int, paths: list[str], token: str | None = None) -> None:
        self.port, self.connections, self.calls, self.paths, self.token = port, connections, calls, paths, token
        self.ends: dict[tuple[int, int], str] = {}
        self.opened = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def _headers(self, path: str) -> list[tuple[str, str]]:
        h = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", f"127.0.0.1:{self.port}"),
             ("content-type", "application/grpc"), ("te", "trailers")]
        return h + ([("authorization", f"Bearer {self.token}")] if self.token else [])

    def open(self) -> "HalfOpen":
        for c in range(self.connections):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            for i in range(self.calls):
                try:
                    conn.send_headers(conn.get_next_available_stream_id(), self._headers(self.paths[i % len(self.paths)]))
                except h2.exceptions.TooManyStreamsError:
                    break
                self.opened += 1
            sock.sendall(conn.data_to_send())
            t = threading.Thread(target=self._read, args=(c, sock, conn), daemon=True)
            t.start()
            self._socks.append(sock)
            self._threads.append(t)
        return self

    def _read(self, c: int, sock: socket.socket, conn: h2.connection.H2Connection) -> None:
        sock.settimeout(None)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                return
            with self._lock:
                for e in events:
                    if isinstance(e, h2.events.StreamReset):
                        self.ends.setdefault((c, e.stream_id), "reset")
                    elif isinstance(e, (h2.events.TrailersReceived, h2.events.ResponseReceived)):
                        status = dict(e.headers).get("grpc-status")
                        if status is not None:
                            self.ends[(c, e.stream_id)] = f"status-{status}"
            try:
                sock.sendall(conn.data_to_send())  # settings and ping acknowledgements: the connection stays up
            except OSError:
                return

    def counts(self) -> Counter:
        with self._lock:
            return Counter(self.ends.values())

    def close(self) -> None:
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(5)
