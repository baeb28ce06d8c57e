"""The server process's signals: a drain on SIGTERM/SIGINT, a forced stop on the second, a reload on SIGHUP.

A drain tells the balancers first: health turns NOT_SERVING, then ``--drain-delay-s`` passes (probes
see it and move traffic; calls still arriving are answered), then the listener stops taking calls and
those in flight get ``--grace`` seconds. A second SIGTERM/SIGINT during a drain cancels what is left
and exits. SIGHUP re-reads ``--token-file`` and ``--tls-cert``/``--tls-key``: a revoked token is refused
from the next call, a new certificate is used from the next connection; a file that does not read or
parse keeps the old one, logged. Search workers ignore all three (:func:`ofa_server.search_worker.
worker_main`): the drain, not a signal, decides when their searches end.
"""
from __future__ import annotations

import logging
import signal
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

from .args import ServeConfig
from .auth import Tokens

__all__ = ["read_tls", "reload", "wait_for_signals"]

log = logging.getLogger("ofa_server")


def read_tls(cert: str, key: str) -> tuple[bytes, bytes]:
    """The PEM certificate chain and key of ``--tls-cert``/``--tls-key``, checked to load as a pair (a
    ValueError names the flag and says why; an OSError when a file does not read)."""
    chain, secret = Path(cert).read_bytes(), Path(key).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:  # ssl loads from files only
        c, k = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        c.write_bytes(chain)
        k.write_bytes(secret)
        try:
            # (a password-protected key is refused, not prompted for on the terminal)
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(c, k, password=lambda: b"")
        except ssl.SSLError as e:
            raise ValueError(f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate chain and its "
                             f"private key: {e}") from None
    return chain, secret


def reload(server: Any, config: ServeConfig, tokens: Tokens | None) -> None:
    """SIGHUP: the token file and the TLS files again; a bad one keeps the old (logged). ``server``: the
    running :class:`ofa_server.main.Server`."""
    if tokens is not None and config.token_file:
        try:
            tokens.replace_with(Tokens.from_file(config.token_file))
            log.info("SIGHUP: %d tokens read from %s", len(tokens), config.token_file)
        except (OSError, ValueError) as e:
            log.error("SIGHUP: keeping the tokens read before: %s", e)
    if config.tls_cert and config.tls_key:
        try:
            server.set_tls(*read_tls(config.tls_cert, config.tls_key))
            log.info("SIGHUP: the certificate in %s is used from the next connection", config.tls_cert)
        except (OSError, ValueError) as e:
            log.error("SIGHUP: keeping the certificate read before: %s", e)


def wait_for_signals(server: Any, config: ServeConfig, tokens: Tokens | None) -> None:
    """Block until a drain (or a forced stop) has stopped ``server``; SIGHUP reloads meanwhile."""
    done, draining = threading.Event(), threading.Event()

    def drain() -> None:
        try:
            server.drain(config.drain_delay_s, config.grace)
        finally:
            done.set()

    def force() -> None:
        try:
            server.stop(0)
        finally:
            done.set()

    def on_stop(signum, frame):
        if draining.is_set():
            log.warning("signal %d during the drain: cancelling the calls in flight and stopping now", signum)
            threading.Thread(target=force, daemon=True).start()
            return
        draining.set()
        log.info("signal %d: NOT_SERVING for %.1f s, then no new calls and %.0f s for those in flight (a second "
                 "signal stops at once)", signum, config.drain_delay_s, config.grace)
        threading.Thread(target=drain, daemon=True).start()

    def on_hup(signum, frame):
        threading.Thread(target=reload, args=(server, config, tokens), daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    done.wait()
    server.wait()
