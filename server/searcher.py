"""Searches in worker processes: a search is CPU-bound Python + numpy, and in the server's
process it would share one GIL with every streaming fetch (measured: a 0.4 s search took
9 s under 32 clients). Each worker gets the server's scorers when it starts; a shared flag per
slot lets the server stop a search whose call was cancelled or timed out, and the call's
deadline travels with the job. A worker that dies or hangs is replaced (:class:`SearchPool`).
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import pickle
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .search_worker import SEARCH_NICENESS, TABLES_KEPT, Job, ParetoJob, SearchJob, Stop, Task, worker_main

if TYPE_CHECKING:
    from ofa.predict.latency import Speed
    from ofa.search import Scorer

__all__ = ["Job", "ParetoJob", "SearchJob", "SearchPool", "WorkerLost", "WorkerStartError"]

log = logging.getLogger("ofa_server")


class WorkerLost(RuntimeError):
    """The search could not run to its end on a worker (it died, hung, or none is ready): retry it."""


class WorkerStartError(OSError):
    """A search worker did not start: the server cannot serve (an OSError: the CLI says it in one line)."""


def _start_failure(slot: int, w: "_Worker", timeout: float) -> str:
    code = w.proc.exitcode
    if code is None:
        return f"search worker {slot} did not say it was ready within {timeout:.0f} s"
    if code < 0:
        return f"search worker {slot} was killed by signal {-code} while it started"
    return (f"search worker {slot} exited with code {code} while it started (a script that starts a server needs an "
            f"`if __name__ == '__main__':` guard, as multiprocessing's spawn does)")


class _Lost(Exception):
    """The worker of a job died or ran too long (the pool then replaces it)."""


@dataclass
class _Worker:
    proc: Any
    conn: Any
    sent: set[int] = field(default_factory=set)  # the versions of the registered tables it was sent
    warmed: int = 0  # scorers it searched once before saying it was ready


class SearchPool:
    """``slots`` worker processes, each with its own pipe; ``run`` blocks until the job ends or ``cancelled()``.

    ``scorers`` (artifact dir -> Scorer, or dirs read here once) go to each worker as it starts, so the
    files are verified once, not per worker. Every worker is started before the constructor returns: a
    worker started on demand would make one search wait for its start-up, and that start-up compete
    with the requests being answered.

    The pool heals: a worker that dies (the OOM killer's SIGKILL), or that does not stop within
    ``stop_grace`` seconds of being told to, or runs past ``max_seconds``, is killed and replaced
    in the background, and the call it had gets :class:`WorkerLost`; ``on_ready(n)`` is told how
    many workers can take a search whenever that changes (health is NOT_SERVING at 0).
    """

    def __init__(self, slots: int, scorers: Mapping[str, Scorer] | Sequence[str] = (), max_seconds: float = 300.0,
                 stop_grace: float = 5.0, start_timeout: float = 120.0,
                 on_ready: Callable[[int], None] = lambda n: None, tables_kept: int = TABLES_KEPT,
                 niceness: int = SEARCH_NICENESS) -> None:
        self._ctx = mp.get_context("spawn")
        if not isinstance(scorers, Mapping):
            from ofa.search.load import load_scorer

            scorers = {str(d): load_scorer(d) for d in scorers}
        self._scorers = dict(scorers)
        self._flags = self._ctx.Array("b", slots, lock=False)
        self.max_seconds, self.stop_grace, self.start_timeout = max_seconds, stop_grace, start_timeout
        self._on_ready = on_ready
        self._notifying = threading.Lock()
        self.tables_kept = tables_kept  # registered tables each worker keeps
        self.niceness = niceness  # added to each worker's nice value
        self.tables_sent = 0  # registered tables sent to a worker (each crosses once per worker that keeps it)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._workers: list[_Worker | None] = []
        self._free: list[int] = []
        self._busy: set[int] = set()
        self.restarts = 0
        # workers ignore SIGTERM (search_worker.worker_main): killed here at exit, before multiprocessing's own
        # exit handler would SIGTERM and then wait for them (atexit runs the later registration first); registered
        # before the first is started, and an interrupt (Ctrl-C) while they start kills those started, or the
        # process would wait at its exit for workers that wait on pipes its traceback still holds open
        atexit.register(self.close)
        try:
            for _ in range(slots):
                self._workers.append(self._spawn())
            for slot, w in enumerate(self._workers):
                if not self._await_ready(w):
                    raise WorkerStartError(_start_failure(slot, w, start_timeout))
                self._free.append(slot)
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._watch, name="ofa-search-watch", daemon=True).start()

    # ---- workers ---------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        args = (child, self._flags, pickle.dumps(self._scorers), self.tables_kept, self.niceness)
        proc = self._ctx.Process(target=worker_main, args=args, daemon=True, name="ofa-search")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _await_ready(self, w: _Worker) -> bool:
        end = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < end and not self._closed.is_set():  # a pool closing waits for no new worker
                if w.conn.poll(0.1):
                    msg = w.conn.recv()
                    w.warmed = msg[2] if msg[0] == "ready" else 0
                    return msg[0] == "ready"
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

    def warmed(self) -> list[int]:
        """By slot, how many scorers each started worker searched once before it said it was ready."""
        with self._lock:
            return [w.warmed for w in self._workers if w is not None]

    def worker_pids(self) -> list[int]:
        """The process ids of the workers now started, by slot."""
        with self._lock:
            return [w.proc.pid for w in self._workers if w is not None]

    def busy_worker_pids(self) -> list[int]:
        """The process ids of the workers running a job now."""
        with self._lock:
            return [self._workers[s].proc.pid for s in sorted(self._busy) if self._workers[s] is not None]

    def _replace(self, slot: int, why: str) -> None:
        """Kill the worker of ``slot`` and start another in the background; the slot is free once it is ready."""
        with self._lock:
            old, self._workers[slot] = self._workers[slot], None
            self._busy.discard(slot)
            if slot in self._free:
                self._free.remove(slot)
            self.restarts += 1
        log.warning("search worker %d (pid %s) %s: replacing it", slot, old.proc.pid if old else "?", why)
        self._notify()
        if old is not None:
            old.proc.kill()
            old.proc.join(5)
            old.conn.close()
        threading.Thread(target=self._restart, args=(slot,), name="ofa-search-restart", daemon=True).start()

    def _notify(self) -> None:
        """Tell ``on_ready`` how many workers can search now. One at a time, each counting when it tells: a
        replacement and a restart that finish together cannot leave the older count last (health NOT_SERVING
        with a worker ready)."""
        with self._notifying:
            self._on_ready(self.ready)

    def _restart(self, slot: int) -> None:
        delay = 0.5
        while not self._closed.is_set():
            w = self._spawn()
            if not self._closed.is_set() and self._await_ready(w):
                with self._lock:
                    if not self._closed.is_set():
                        self._workers[slot] = w
                        self._flags[slot] = 0
                        self._free.append(slot)
                if self._workers[slot] is w:
                    log.info("search worker %d replaced (pid %d)", slot, w.proc.pid)
                    self._notify()
                    return
            elif not self._closed.is_set():
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
    def run(self, job: Job, artifact_dir: str, cancelled: Stop = lambda: False, *,
            table: tuple[int, dict] | None = None, speed: Speed | None = None, deadline: float | None = None) -> Any:
        """Run ``job`` on the scorer of ``artifact_dir``; ``table`` is a registered target's (version, table),
        sent to a worker only when it does not keep it; ``speed`` the device's speed now; ``deadline`` a
        ``time.monotonic()`` value. Blocks until the job ends or ``cancelled()``. Raises :class:`WorkerLost`
        when it could not run to its end (retryable), and what the job raised otherwise."""
        slot, w = self._take()
        self._flags[slot] = 0
        offered = None if table is None else (table[0], None if table[0] in w.sent else table[1])
        task = Task(job, artifact_dir, offered, speed, slot, deadline)
        try:
            status, value = self._answer(slot, w, task, table, cancelled)
        except (_Lost, EOFError, OSError) as e:
            raise self._lost(slot, w, e) from None
        except BaseException as e:  # its pipe in an unknown state (a pickle that failed halfway): never kept busy
            if self._workers[slot] is w and not self._closed.is_set():
                self._replace(slot, f"was left in an unknown state ({type(e).__name__})")
            raise
        self._done(slot, w, table)
        if status == "ok":
            return value
        raise value

    def _take(self) -> tuple[int, _Worker]:
        """A free slot whose worker is alive, now marked busy."""
        with self._lock:
            slots = [s for s in self._free if self._workers[s].proc.is_alive()]
            if not slots:
                raise WorkerLost("no search worker is ready (one is being restarted); retry in a few seconds")
            slot = slots[-1]
            self._free.remove(slot)
            self._busy.add(slot)
            return slot, self._workers[slot]

    def _send(self, w: _Worker, task: Task) -> None:
        if task.table is not None and task.table[1] is not None:
            with self._lock:
                self.tables_sent += 1
        w.conn.send(task)

    def _answer(self, slot: int, w: _Worker, task: Task, table: tuple[int, dict] | None,
                cancelled: Stop) -> tuple[str, Any]:
        """Send ``task`` and wait for the worker's (status, value); stop the job when the call is cancelled
        or past its deadline, and give up on a worker that dies, hangs or runs too long."""
        t0, stop_at, deadline = time.monotonic(), None, task.deadline
        self._send(w, task)
        while True:
            if w.conn.poll(0.05):
                status, value = w.conn.recv()
                if status != "missing":
                    return status, value
                self._send(w, replace(task, table=table))  # it no longer keeps the table (or never had it)
                continue
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

    def _done(self, slot: int, w: _Worker, table: tuple[int, dict] | None) -> None:
        """The worker ``w`` of ``slot`` answered: it keeps ``table`` now, and is free."""
        if table is not None:
            if len(w.sent) >= 4 * self.tables_kept:
                w.sent.clear()
            w.sent.add(table[0])
        with self._lock:
            self._busy.discard(slot)
            self._free.append(slot)

    def _lost(self, slot: int, w: _Worker, e: Exception) -> WorkerLost:
        """The job could not run to its end on ``w``: replace it (unless the pool is closing)."""
        if self._closed.is_set():
            return WorkerLost("the server is stopping; retry on another replica")
        if isinstance(e, _Lost):
            why = str(e)
        else:  # the pipe closed: the worker is gone or going
            w.proc.join(1)
            why = (f"the search worker died (exit code {w.proc.exitcode})" if w.proc.exitcode is not None
                   else "the search worker's pipe closed")
        self._replace(slot, why)
        return WorkerLost(f"{why}; it has been replaced: retry")

    def close(self) -> None:
        """Kill every worker: a search still running gets :class:`WorkerLost`."""
        self._closed.set()
        with self._lock:
            workers = [w for w in self._workers if w is not None]
        for w in workers:
            w.proc.kill()
        for w in workers:
            w.proc.join(5)
            w.conn.close()
        atexit.unregister(self.close)  # last: a worker still alive must not outlive the process's exit
