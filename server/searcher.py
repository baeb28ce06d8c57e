"""Searches in worker processes: a search is CPU-bound Python + numpy, and in the server's
process it would share one GIL with every streaming fetch (measured: a 0.4 s search took
9 s under 32 clients). Each worker loads the artifacts' scorers once; a shared flag per
slot lets the server stop a search whose call was cancelled or timed out, and the call's
deadline travels with the job. A worker that dies or hangs is replaced (:class:`SearchPool`).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["SearchPool", "WorkerLost"]

log = logging.getLogger("ofa_server")

SEARCH_NICENESS = 10  # added to the workers' nice value (CFS then weights them about 1:10)
_scorers: dict[str, Any] = {}  # per worker process: artifact dir -> Scorer (a cache of read-only files)
_tables: "OrderedDict[int, Any]" = OrderedDict()  # per worker: registered table version -> LatencyPredictor
TABLES_KEPT = 16  # registered tables a worker keeps (the most recently used)
_flags = None


def _init(flags, artifact_dirs: tuple[str, ...]) -> None:
    global _flags
    _flags = flags
    # one BLAS thread per worker: the workers already run one search per core, and
    # oversubscribed BLAS threads spin against each other (before numpy is imported here)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    # A search is batch work; streaming weights is waited on. At a lower priority the
    # searches take the cores only when the server's own threads do not need them.
    os.nice(SEARCH_NICENESS)
    for d in artifact_dirs:  # now, not in the first search each worker runs
        try:
            _scorer(d)
        except Exception:  # noqa: BLE001 - the search that needs this artifact reports it
            pass


def _scorer(artifact_dir: str):
    from ofa.search.load import load_scorer

    scorer = _scorers.get(artifact_dir)
    if scorer is None:
        scorer = _scorers[artifact_dir] = load_scorer(artifact_dir)
    return scorer


class _TableMissing(Exception):
    """The job names a registered table by version that this worker does not keep: send it."""


def _registered(scorer, table: tuple[int, dict | None]):
    """The predictor of a registered table, sent once per worker: (version, table or None once sent)."""
    from ofa.predict.latency import LatencyPredictor

    version, body = table
    pred = _tables.get(version)
    if pred is None:
        if body is None:
            raise _TableMissing(version)
        pred = _tables[version] = LatencyPredictor(scorer.space, body)
    _tables.move_to_end(version)
    while len(_tables) > TABLES_KEPT:
        _tables.popitem(last=False)
    return pred


def _job(kind: str, artifact_dir: str, table: tuple[int, dict | None] | None, speed: float | None, slot: int,
         args: tuple, deadline: float | None = None) -> Any:
    from ofa.search import Scorer, pareto_front, search

    scorer = _scorer(artifact_dir)
    target = args[1]  # search: (constraints, target, settings); pareto: (points, target, ...)
    latency = dict(scorer.latency)
    if table is not None:
        pred = _registered(scorer, table)
        latency[pred.table["target"]] = pred
    if speed is not None and target in latency:  # the device's speed now, from the request's timings
        latency[target] = latency[target].with_speed(speed)
    if latency != scorer.latency:
        scorer = Scorer(scorer.space, scorer.accuracy, latency, scorer.refused)
    # the call's deadline is kept here too (CLOCK_MONOTONIC is one clock for all processes), so a search
    # stops at it even when the server's flag does not reach it
    stop = lambda: _flags[slot] != 0 or (deadline is not None and time.monotonic() > deadline)  # noqa: E731
    if kind == "search":
        return search(scorer, *args, should_stop=stop)
    return pareto_front(scorer, *args, should_stop=stop)


def _worker_main(conn, flags, artifact_dirs: tuple[str, ...]) -> None:
    """A worker: load the scorers, say ready, then run one job at a time until the pipe closes."""
    _init(flags, artifact_dirs)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            out = ("ok", _job(*job))
        except _TableMissing:
            out = ("missing", None)
        except Exception as e:  # noqa: BLE001 - Infeasible, SearchCancelled... are the caller's to map
            out = ("error", e)
        try:
            conn.send(out)
        except Exception:  # noqa: BLE001 - an exception that does not pickle still reaches the caller
            conn.send(("error", RuntimeError(f"{type(out[1]).__name__}: {str(out[1])[:500]}")))


class WorkerLost(RuntimeError):
    """The search could not run to its end on a worker (it died, hung, or none is ready): retry it."""


@dataclass
class _Worker:
    proc: Any
    conn: Any


class SearchPool:
    """``slots`` worker processes, each with its own pipe; ``run`` blocks until the job ends or ``cancelled()``.

    Every worker is started, and has read the predictors of ``artifact_dirs``, before the
    constructor returns: a worker started on demand would make one search wait for its
    start-up, and that start-up compete with the requests being answered.

    The pool heals: a worker that dies (the OOM killer's SIGKILL), or that does not stop within
    ``stop_grace`` seconds of being told to, or runs past ``max_seconds``, is killed and replaced
    in the background, and the call it had gets :class:`WorkerLost`; ``on_ready(n)`` is told how
    many workers can take a search whenever that changes (health is NOT_SERVING at 0).
    """

    def __init__(self, slots: int, artifact_dirs: tuple[str, ...] = (), max_seconds: float = 300.0,
                 stop_grace: float = 5.0, start_timeout: float = 120.0,
                 on_ready: Callable[[int], None] = lambda n: None) -> None:
        self._ctx = mp.get_context("spawn")
        self._dirs = tuple(artifact_dirs)
        self._flags = self._ctx.Array("b", slots, lock=False)
        self.max_seconds, self.stop_grace, self.start_timeout = max_seconds, stop_grace, start_timeout
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._workers: list[_Worker | None] = [self._spawn() for _ in range(slots)]
        self._sent: list[set[int]] = [set() for _ in range(slots)]  # table versions each worker was sent
        self._free: list[int] = []
        self._busy: set[int] = set()
        self.restarts = 0
        for slot, w in enumerate(self._workers):
            if not self._await_ready(w):
                self.close()
                raise RuntimeError(f"search worker {slot} did not start within {start_timeout:.0f} s (exit code "
                                   f"{w.proc.exitcode}; a script that starts a server needs an "
                                   f"`if __name__ == '__main__':` guard, as multiprocessing's spawn does)")
            self._free.append(slot)
        self._watcher = threading.Thread(target=self._watch, name="ofa-search-watch", daemon=True)
        self._watcher.start()

    # ---- workers ---------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._flags, self._dirs), daemon=True,
                                 name="ofa-search")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _await_ready(self, w: _Worker) -> bool:
        end = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < end:
                if w.conn.poll(0.1):
                    return w.conn.recv()[0] == "ready"
                if not w.proc.is_alive():  # it failed to start: say so now, not after the timeout
                    return False
        except (EOFError, OSError):
            pass
        return False

    @property
    def ready(self) -> int:
        """Workers alive and able to take a search (idle or busy)."""
        with self._lock:
            return len(self._free) + len(self._busy)

    def _replace(self, slot: int, why: str) -> None:
        """Kill the worker of ``slot`` and start another in the background; the slot is free once it is ready."""
        with self._lock:
            old, self._workers[slot] = self._workers[slot], None
            self._busy.discard(slot)
            if slot in self._free:
                self._free.remove(slot)
            self.restarts += 1
            n = len(self._free) + len(self._busy)
        log.warning("search worker %d (pid %s) %s: replacing it", slot, old.proc.pid if old else "?", why)
        self._on_ready(n)
        if old is not None:
            old.proc.kill()
            old.proc.join(5)
            old.conn.close()
        threading.Thread(target=self._restart, args=(slot,), name="ofa-search-restart", daemon=True).start()

    def _restart(self, slot: int) -> None:
        delay = 0.5
        while not self._closed.is_set():
            w = self._spawn()
            if self._await_ready(w):
                with self._lock:
                    if not self._closed.is_set():
                        self._workers[slot] = w
                        self._sent[slot] = set()
                        self._flags[slot] = 0
                        self._free.append(slot)
                        n = len(self._free) + len(self._busy)
                if self._workers[slot] is w:
                    log.info("search worker %d replaced (pid %d)", slot, w.proc.pid)
                    self._on_ready(n)
                    return
            else:
                log.error("a new search worker did not start; trying again in %.1f s", delay)
            w.proc.kill()
            w.proc.join(5)
            w.conn.close()
            self._closed.wait(delay)
            delay = min(2 * delay, 30.0)

    def _watch(self) -> None:
        """Replace idle workers that died, so that health tells the truth before the next search."""
        while not self._closed.wait(0.2):
            with self._lock:
                dead = [s for s in self._free if not self._workers[s].proc.is_alive()]
            for slot in dead:
                self._replace(slot, f"died while idle (exit code {self._workers[slot].proc.exitcode})")

    # ---- jobs ------------------------------------------------------------------------
    def run(self, kind: str, artifact_dir: str, table: tuple[int, dict] | None, speed: float | None, args: tuple,
            cancelled: Callable[[], bool], deadline: float | None = None) -> Any:
        """Run a job; ``table`` is a registered target's (version, table), sent to a worker only when it does
        not keep it; ``deadline`` is a ``time.monotonic()`` value. Raises :class:`WorkerLost` when it could
        not run to its end (retryable), and what the job raised otherwise."""
        with self._lock:
            slots = [s for s in self._free if self._workers[s].proc.is_alive()]
            if not slots:
                raise WorkerLost("no search worker is ready (one is being restarted); retry in a few seconds")
            slot = slots[-1]
            self._free.remove(slot)
            self._busy.add(slot)
            w = self._workers[slot]
        self._flags[slot] = 0
        t0, stop_at = time.monotonic(), None
        job = [kind, artifact_dir, None, speed, slot, args, deadline]
        if table is not None:  # the version alone once this worker has been sent the table
            job[2] = (table[0], None if table[0] in self._sent[slot] else table[1])
        try:
            w.conn.send(tuple(job))
            while True:
                if w.conn.poll(0.05):
                    status, value = w.conn.recv()
                    if status == "missing":  # it no longer keeps the table (or never had it): send it
                        job[2] = table
                        w.conn.send(tuple(job))
                        continue
                    if table is not None:
                        if len(self._sent[slot]) >= 4 * TABLES_KEPT:
                            self._sent[slot].clear()
                        self._sent[slot].add(table[0])
                    with self._lock:
                        self._busy.discard(slot)
                        self._free.append(slot)
                    if status == "ok":
                        return value
                    raise value
                now = time.monotonic()
                if not w.proc.is_alive():
                    raise _Lost(f"the search worker died (exit code {w.proc.exitcode})")
                if stop_at is None and (cancelled() or (deadline is not None and now > deadline)):
                    self._flags[slot] = 1
                    stop_at = now
                if stop_at is not None and now - stop_at > self.stop_grace:  # stuck (SIGSTOP, a bug): the call is over
                    self._replace(slot, f"did not stop within {self.stop_grace:g} s of being told to")
                    from ofa.search import SearchCancelled

                    raise SearchCancelled("the search was stopped")
                if now - t0 > self.max_seconds:
                    raise _Lost(f"the search ran past the server's limit of {self.max_seconds:g} s")
        except (_Lost, EOFError, OSError) as e:
            if self._closed.is_set():
                raise WorkerLost("the server is stopping; retry on another replica") from None
            if isinstance(e, _Lost):
                why = str(e)
            else:  # the pipe closed: the worker is gone or going
                w.proc.join(1)
                why = (f"the search worker died (exit code {w.proc.exitcode})" if w.proc.exitcode is not None
                       else "the search worker's pipe closed")
            self._replace(slot, why)
            raise WorkerLost(f"{why}; it has been replaced: retry") from None

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            workers = [w for w in self._workers if w is not None]
        for w in workers:
            w.proc.kill()
        for w in workers:
            w.proc.join(5)
            w.conn.close()


class _Lost(Exception):
    pass
