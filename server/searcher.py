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

_scorers: dict[str, Any] = {}  # per worker process: artifact dir -> Scorer (a cache of read-only files)
_flags = None


def _init(flags) -> None:
    global _flags
    _flags = flags
    # one BLAS thread per worker: the workers already run one search per core, and
    # oversubscribed BLAS threads spin against each other (before numpy is imported here)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def _job(kind: str, artifact_dir: str, table: dict | None, slot: int, args: tuple) -> Any:
    from ofa.predict.latency import LatencyPredictor
    from ofa.search import Scorer, pareto_front, search
    from ofa.search.load import load_scorer

    scorer = _scorers.get(artifact_dir)
    if scorer is None:
        scorer = _scorers[artifact_dir] = load_scorer(artifact_dir)
    if table is not None:
        scorer = Scorer(scorer.space, scorer.accuracy,
                        {**scorer.latency, table["target"]: LatencyPredictor(scorer.space, table)})
    stop = lambda: _flags[slot] != 0  # noqa: E731
    if kind == "search":
        return search(scorer, *args, should_stop=stop)
    return pareto_front(scorer, *args, should_stop=stop)


class SearchPool:
    """``slots`` worker processes; ``run`` blocks until the job ends or ``cancelled()`` turns true."""

    def __init__(self, slots: int) -> None:
        ctx = mp.get_context("spawn")
        self._flags = ctx.Array("b", slots, lock=False)
        self._free = list(range(slots))
        self._lock = threading.Lock()
        self._pool = ProcessPoolExecutor(slots, mp_context=ctx, initializer=_init, initargs=(self._flags,))

    def run(self, kind: str, artifact_dir: str, table: dict | None, args: tuple,
            cancelled: Callable[[], bool]) -> Any:
        with self._lock:
            slot = self._free.pop()
        self._flags[slot] = 0
        try:
            future = self._pool.submit(_job, kind, artifact_dir, table, slot, args)
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
