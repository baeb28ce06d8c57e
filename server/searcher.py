"""Searches in worker processes: a search is CPU-bound Python + numpy, and in the server's
process it would share one GIL with every streaming fetch (measured: a 0.4 s search took
9 s under 32 clients). Each worker loads the artifacts' scorers once; a shared flag per
slot lets the server stop a search whose call was cancelled or timed out.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
from typing import Any, Callable

__all__ = ["SearchPool"]

SEARCH_NICENESS = 10  # added to the workers' nice value (CFS then weights them about 1:10)
_scorers: dict[str, Any] = {}  # per worker process: artifact dir -> Scorer (a cache of read-only files)
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


def _ready() -> int:
    return os.getpid()


def _job(kind: str, artifact_dir: str, table: dict | None, speed: float | None, slot: int, args: tuple) -> Any:
    from ofa.predict.latency import LatencyPredictor
    from ofa.search import Scorer, pareto_front, search

    scorer = _scorer(artifact_dir)
    target = args[1]  # search: (constraints, target, settings); pareto: (points, target, ...)
    latency = dict(scorer.latency)
    if table is not None:
        latency[table["target"]] = LatencyPredictor(scorer.space, table)
    if speed is not None and target in latency:  # the device's speed now, from the request's timings
        latency[target] = latency[target].with_speed(speed)
    if latency != scorer.latency:
        scorer = Scorer(scorer.space, scorer.accuracy, latency, scorer.refused)
    stop = lambda: _flags[slot] != 0  # noqa: E731
    if kind == "search":
        return search(scorer, *args, should_stop=stop)
    return pareto_front(scorer, *args, should_stop=stop)


class SearchPool:
    """``slots`` worker processes; ``run`` blocks until the job ends or ``cancelled()`` turns true.

    Every worker is started, and has read the predictors of ``artifact_dirs``, before the
    constructor returns: a worker started on demand would make one search wait for its
    start-up, and that start-up compete with the requests being answered.
    """

    def __init__(self, slots: int, artifact_dirs: tuple[str, ...] = ()) -> None:
        ctx = mp.get_context("spawn")
        self._flags = ctx.Array("b", slots, lock=False)
        self._free = list(range(slots))
        self._lock = threading.Lock()
        self._pool = ProcessPoolExecutor(slots, mp_context=ctx, initializer=_init,
                                         initargs=(self._flags, tuple(artifact_dirs)))
        # each submit finds no idle worker and starts one, so ``slots`` jobs start them all
        for job in [self._pool.submit(_ready) for _ in range(slots)]:
            job.result()

    def run(self, kind: str, artifact_dir: str, table: dict | None, speed: float | None, args: tuple,
            cancelled: Callable[[], bool]) -> Any:
        with self._lock:
            slot = self._free.pop()
        self._flags[slot] = 0
        try:
            future = self._pool.submit(_job, kind, artifact_dir, table, speed, slot, args)
            while True:
                try:
                    return future.result(timeout=0.05)
                except FutureTimeout:
                    if cancelled():
                        self._flags[slot] = 1
        finally:
            with self._lock:
                self._free.append(slot)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
