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
import os
import signal
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .args import ServeConfig
from .auth import Tokens

__all__ = ["Interrupted", "Signals", "interrupt_start", "read_tls", "reload", "stop_with_parent"]

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


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT while the server starts: nothing is served yet, so there is nothing to drain (the CLI
    says so in one line and exits 128 + the signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum} while starting: nothing was served")
        self.signum = signum


def interrupt_start() -> None:
    """Until :class:`Signals` takes over: SIGTERM/SIGINT raise :class:`Interrupted` (the search workers already
    started are killed on the way out), SIGHUP is ignored (its files are read after this)."""
    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def stop_with_parent(interval: float = 0.5) -> None:
    """``--stop-with-parent``: SIGTERM to this process (a drain, or :class:`Interrupted` while starting) once its
    parent is gone, killed or not (a parent that runs the server for a while, as ``ofa report`` does)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("the parent process %d is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="ofa-parent-watch", daemon=True).start()


class Signals:
    """SIGTERM/SIGINT drain, a second one stops at once, SIGHUP reloads. Installed before the server starts
    (:meth:`serve` then hands it over): from its first health answer a signal drains it, never the default
    action that would end the process with no drain (a probe answered SERVING, then a SIGTERM, races the
    main thread otherwise)."""

    def __init__(self, config: ServeConfig, tokens: Tokens | None) -> None:
        self.config, self.tokens, self.server = config, tokens, None
        self.done, self.draining, self._started = threading.Event(), threading.Event(), threading.Event()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def serve(self, server: Any) -> None:
        """Handle the signals for ``server`` (started); block until a drain or a forced stop has stopped it."""
        self.server = server
        self._started.set()
        self.done.wait()
        server.wait()

    def _later(self, act, *args) -> None:
        def run() -> None:
            self._started.wait()  # a signal while the server starts acts once it has
            act(self.server, *args)
        threading.Thread(target=run, daemon=True).start()

    def _end(self, act) -> None:
        def run(server: Any) -> None:
            try:
                act(server)
            finally:
                self.done.set()
        self._later(run)

    def _on_stop(self, signum, frame) -> None:
        if self.draining.is_set():
            log.warning("signal %d during the drain: cancelling the calls in flight and stopping now", signum)
            self._end(lambda server: server.stop(0))
            return
        self.draining.set()
        c = self.config
        log.info("signal %d: NOT_SERVING for %.1f s, then no new calls and %.0f s for those in flight (a second "
                 "signal stops at once)", signum, c.drain_delay_s, c.grace)
        self._end(lambda server: server.drain(c.drain_delay_s, c.grace))

    def _on_hup(self, signum, frame) -> None:
        self._later(reload, self.config, self.tokens)
