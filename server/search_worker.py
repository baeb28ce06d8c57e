"""The search worker process: the jobs it runs, what crosses the pipe to it, and its main loop. Each worker
gets the server's scorers when it starts, takes the niceness it is given, searches once per scorer to warm up, says it
is ready, and runs one task at a time; a slot's shared flag or the call's deadline stops a search
(:class:`server.searcher.SearchPool` starts, feeds and replaces them).
"""
from __future__ import annotations

import os
import pickle
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Union

if TYPE_CHECKING:  # the worker imports numpy only after it has set its BLAS threads
    from ofa.predict.latency import LatencyPredictor, Speed
    from ofa.search import Candidate, Constraints, Scorer, SearchResult, SearchSettings

__all__ = ["Job", "ParetoJob", "SEARCH_NICENESS", "SearchJob", "Stop", "TABLES_KEPT", "Task", "worker_main"]

# added to the workers' nice value by default: none. At 10 (CFS weights them ~1:10) a search beside one busy process
# took 7x as long (2.6 s, not 0.37 s), for no fetch latency gained below saturation (docs/service.md)
SEARCH_NICENESS = 0
TABLES_KEPT = 16  # registered tables a worker keeps (the most recently used)
Stop = Callable[[], bool]


# ---- jobs: what a worker runs (each job type knows its function) --------------------
@dataclass(frozen=True)
class SearchJob:
    """The best arch under ``constraints`` (:func:`ofa.search.search`)."""

    constraints: Constraints
    target: str | None
    settings: SearchSettings

    def run(self, scorer: Scorer, should_stop: Stop) -> SearchResult:
        """Run the search on ``scorer`` (in a worker)."""
        from ofa.search import search

        return search(scorer, self.constraints, self.target, self.settings, should_stop=should_stop)


@dataclass(frozen=True)
class ParetoJob:
    """Up to ``points`` archs on the accuracy-latency front (:func:`ofa.search.pareto_front`)."""

    points: int
    target: str | None
    constraints: Constraints
    settings: SearchSettings

    def run(self, scorer: Scorer, should_stop: Stop) -> list[Candidate]:
        """Search the front on ``scorer`` (in a worker)."""
        from ofa.search import pareto_front

        return pareto_front(scorer, self.points, self.target, self.constraints, self.settings, should_stop=should_stop)


Job = Union[SearchJob, ParetoJob]


@dataclass(frozen=True)
class Task:
    """What crosses the pipe to a worker: a job and the scorer it runs on."""

    job: Job
    artifact_dir: str
    table: tuple[int, dict | None] | None  # a registered target's (version, table or None once this worker has it)
    speed: Speed | None  # the device's speed now, from the request's timings
    slot: int
    deadline: float | None  # a time.monotonic() value


class _TableMissing(Exception):
    """The task names a registered table by version that this worker does not keep: send it."""


class _WorkerState:
    """What one worker process keeps between tasks: the slots' stop flags, a scorer per artifact and the
    registered tables it was sent (the most recently used ``tables_kept``)."""

    def __init__(self, flags, tables_kept: int, scorers: dict[str, Scorer]) -> None:
        self.flags, self.tables_kept = flags, tables_kept
        self.scorers = dict(scorers)  # artifact dir -> Scorer, as the server verified it (not read again here)
        self.tables: "OrderedDict[int, LatencyPredictor]" = OrderedDict()  # table version -> predictor
        self.parent = os.getppid()  # a search stops once the server is gone (SIGKILLed), not at its deadline

    def warm_up(self) -> int:
        """One tiny search on each scorer with an accuracy predictor, before the worker says it is ready: the
        first call's costs (lazy imports, first use of each numpy path) are paid now, not by the first
        request, nor by whatever a client times just after the server says SERVING. Returns how many."""
        from ofa.search import Constraints, SearchSettings, search

        warmed = 0
        for scorer in self.scorers.values():
            if scorer.accuracy is not None:
                search(scorer, Constraints(), None, SearchSettings(population=8, generations=2))
                warmed += 1
        return warmed

    def scorer(self, artifact_dir: str) -> Scorer:
        if artifact_dir not in self.scorers:  # one the server did not send: read here
            from ofa.search.load import load_scorer

            self.scorers[artifact_dir] = load_scorer(artifact_dir)
        return self.scorers[artifact_dir]

    def registered(self, scorer: Scorer, table: tuple[int, dict | None]) -> LatencyPredictor:
        """The predictor of a registered table, sent once per worker: (version, table or None once sent)."""
        from ofa.predict.latency import LatencyPredictor

        version, body = table
        pred = self.tables.get(version)
        if pred is None:
            if body is None:
                raise _TableMissing(version)
            pred = self.tables[version] = LatencyPredictor(scorer.space, body)
        self.tables.move_to_end(version)
        while len(self.tables) > self.tables_kept:
            self.tables.popitem(last=False)
        return pred

    def run(self, task: Task) -> Any:
        from ofa.search import Scorer

        scorer = self.scorer(task.artifact_dir)
        target = task.job.target
        latency = dict(scorer.latency)
        if task.table is not None:
            pred = self.registered(scorer, task.table)
            latency[pred.table["target"]] = pred
        if task.speed is not None and target in latency:
            latency[target] = latency[target].with_speed(task.speed)
        if latency != scorer.latency:
            scorer = Scorer(scorer.space, scorer.accuracy, latency, scorer.refused)
        # the call's deadline is kept here too (CLOCK_MONOTONIC is one clock for all processes), so a search
        # stops at it even when the server's flag does not reach it
        slot, end = task.slot, task.deadline
        return task.job.run(scorer, lambda: self.flags[slot] != 0 or (end is not None and time.monotonic() > end)
                            or os.getppid() != self.parent)


def worker_main(conn, flags, scorers: bytes, tables_kept: int, niceness: int = SEARCH_NICENESS) -> None:
    """A worker: say ready, then run one task at a time until the pipe closes (``scorers``: pickled ones), at
    ``niceness`` added to its nice value."""
    # one BLAS thread per worker: the workers already run one search per core, and oversubscribed BLAS
    # threads spin against each other (set before numpy loads: the scorers are unpickled after it)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    # the server decides when a search ends (a drain finishes it, then closes the pipe): a Ctrl-C to the
    # terminal's process group, systemd's SIGTERM to the control group or a SIGHUP must not end it first
    os.setpgrp()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # ofa serve --search-niceness: a server may put its searches below its own threads (weight streams, health)
    os.nice(niceness)
    state = _WorkerState(flags, tables_kept, pickle.loads(scorers))  # the parent's pipe, not a file
    try:
        conn.send(("ready", os.getpid(), state.warm_up()))
    except OSError:  # the server went away while this one started
        return
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        try:
            out = ("ok", state.run(task))
        except _TableMissing:
            out = ("missing", None)
        except Exception as e:  # noqa: BLE001 - Infeasible, SearchCancelled... are the caller's to map
            out = ("error", e)
        try:
            _send(conn, out)
        except OSError:  # the server is gone (its end of the pipe closed): nothing to answer, no traceback
            return


def _send(conn, out: tuple[str, Any]) -> None:
    """Send a task's outcome; an exception that does not pickle still reaches the caller, as its text."""
    try:
        conn.send(out)
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - whatever pickling raised
        conn.send(("error", RuntimeError(f"{type(out[1]).__name__}: {str(out[1])[:500]}")))
