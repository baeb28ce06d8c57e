"""The timing protocol's numpy half, shared by ``ofa profile`` and ``ofa-client profile`` (no torch).

Networks are timed in a worker process (:mod:`ofa_client._timer`) that imports only the runtime
being timed, never in the process that made them. The worker fixes the thread count, warms every
network up, gives each sample as many calls as fill ``sample_ms``, and interleaves the networks in
``rounds`` passes of seeded random order, so that a machine speeding up or slowing down hits all of
them alike. The figure kept per network is the :data:`STATISTIC` of its samples; the rounds split in
two halves give two independent timings, whose agreement is the protocol's own repeatability
(:meth:`Timings.repeatability`). Needs numpy only.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["NOISY_SCATTER", "PRECISIONS", "STATISTIC", "TimingError", "Timings", "WORKER", "check_sizes",
           "describe_cpu", "machine_speed", "run_workers", "spearman", "statistic"]

STATISTIC = "median over passes of the fastest sample, at the median machine speed"  # docs/latency.md
WINDOW = 24          # networks around each timing that measure the machine's speed then
NOISY_SCATTER = 0.05  # the halves of the rounds disagree by more than this per network, drift aside: noisy
SILENCE_S = 900.0     # a worker that reports nothing for this long is stuck and is killed
STOP_POLL_S = 0.25    # how often run_workers asks its ``stop`` whether to kill the workers
PRECISIONS = ("fp32", "int8")  # what a target is timed at (int8: quantized networks; see ofa.export)
WORKER = Path(__file__).with_name("_timer.py")  # run as a script: ``python -I _timer.py``


class TimingError(RuntimeError):
    """The timing worker failed or hung; the message says how and ends with its stderr."""


def check_sizes(threads: int, batch: int, rounds: int, samples: int, sample_ms: float, warmup_ms: float) -> None:
    """Refuse protocol sizes a worker cannot use, naming the field and what is allowed."""
    for name, value, low in (("threads", threads, 1), ("batch", batch, 1), ("rounds", rounds, 2),
                             ("samples", samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("sample_ms", sample_ms), ("warmup_ms", warmup_ms)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be > 0 (milliseconds), got {value!r}")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (no ties expected: timings are real numbers)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _pass_minima(samples: np.ndarray) -> np.ndarray:
    """(networks, rounds): each network's fastest sample of each pass. Another tenant of the cores only ever
    slows a sample down, so within a pass the fastest of its samples is the least disturbed one."""
    return samples.min(axis=2)


def machine_speed(samples: np.ndarray, orders: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """How slow the machine ran while each network was timed in each pass, relative to the run (networks,
    rounds): the median, over the ``window`` networks timed around it, of their pass minimum then over
    their own median. Networks are timed in random order, so a window of them measures the machine, not a
    network."""
    n, rounds = samples.shape[:2]
    per_pass = _pass_minima(samples)
    base = np.median(per_pass, axis=1)
    seq_i = np.asarray(orders).reshape(-1)
    seq_r = np.repeat(np.arange(rounds), n)
    for _ in range(2):  # the networks' own medians, then again with the machine's speed divided out
        series = per_pass[seq_i, seq_r] / base[seq_i]
        half = window // 2
        padded = np.pad(series, half, mode="edge")
        level = np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)
        speed = np.empty((n, rounds))
        speed[seq_i, seq_r] = level / np.median(level)
        base = np.median(per_pass / speed, axis=1)
    return speed


def statistic(samples: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """The figure per network: the median over passes of its fastest sample in each pass, once the
    machine's speed at that moment is divided out (:func:`machine_speed`) — its time with the machine at
    its median speed of the run.

    Two kinds of noise, each met by one step. A shared machine changes speed as a whole every few
    seconds (measured here: ten reference subnets x0.59 to x1.47 of their first timing within 8
    minutes, docs/latency.md): dividing that out keeps the passes comparable. Another process on the
    cores preempts single samples (two busy loops at nice 10): the fastest sample of a pass is the one it
    spared. Two independent runs of 60 subnets ranked alike at Spearman 0.9963 quiet and 0.9923 under
    two busy loops; the median of all samples, speed divided out, ranked 0.9964 quiet but 0.840 loaded.
    """
    speed = machine_speed(samples, orders)
    return np.median(_pass_minima(samples) / speed, axis=1)


@dataclass(frozen=True)
class Timings:
    """Every sample's per-call time (ms), shaped (networks, rounds, samples), the order each pass timed the
    networks in (rounds, networks), and how long it took."""

    samples_ms: np.ndarray
    calls: tuple[int, ...]
    seconds: float
    orders: np.ndarray
    passes: tuple[int, ...] = ()  # a run joined from passes in fresh workers: each pass's rounds, in order

    @property
    def ms(self) -> np.ndarray:
        """One figure per network (the :data:`STATISTIC`)."""
        return statistic(self.samples_ms, self.orders)

    def pass_ms(self) -> list[np.ndarray]:
        """One figure per network from each pass (:attr:`ms` alone for a run of one pass)."""
        if len(self.passes) < 2:
            return [self.ms]
        edges = np.cumsum((0, *self.passes))
        return [statistic(self.samples_ms[:, a:b], self.orders[a:b]) for a, b in zip(edges[:-1], edges[1:])]

    def halves(self) -> tuple[np.ndarray, np.ndarray]:
        """The figure from the even and from the odd rounds: two independent timings."""
        return (statistic(self.samples_ms[:, 0::2], self.orders[0::2]),
                statistic(self.samples_ms[:, 1::2], self.orders[1::2]))

    def round_speeds(self) -> np.ndarray:
        """How slow the machine ran in each pass relative to the whole run (median over its networks)."""
        return np.median(machine_speed(self.samples_ms, self.orders), axis=0)

    def repeatability(self) -> dict[str, Any]:
        """How well the two halves of the rounds agree, and whether that is good enough to trust the figures.

        A shared machine changes speed as a whole (the other tenants of its cores come and go): the halves'
        common ratio is that drift, and a table re-timed later meets it as a speed to recalibrate. What is
        left once it is divided out is the timing's own scatter, and that decides trust.
        """
        a, b = self.halves()
        drift = float(np.median(a / b))
        scatter = float(np.median(np.abs(a / b / drift - 1)))
        rho = spearman(a, b) if len(a) >= 3 else float("nan")
        speeds = self.round_speeds()
        trusted = scatter <= NOISY_SCATTER
        verdict = ("the two halves of the rounds agree" if trusted else
                   f"the machine is too noisy to trust these timings: the two halves of the rounds disagree by "
                   f"{scatter:.1%} per network once their common drift is divided out (at most "
                   f"{NOISY_SCATTER:.0%} is trusted). Close other programs, or time with more rounds")
        return {"networks": len(a), "scatter": round(scatter, 5), "halves_drift": round(drift, 5),
                "spearman": None if np.isnan(rho) else round(rho, 5),
                "round_speeds": [round(float(x), 4) for x in speeds], "trusted": trusted, "verdict": verdict}


def run_workers(jobs: Sequence[Mapping[str, Any]], folder: Path, desc: str, counter: str,
                on_progress: Callable[[int], None] = lambda done: None,
                stop: Callable[[], bool] | None = None) -> list[Any]:
    """Run each job in its own worker process, side by side; their results (a worker that fails, or says
    nothing for :data:`SILENCE_S`, raises :class:`TimingError` with its stderr). ``stop()`` true (asked every
    :data:`STOP_POLL_S`) kills the workers and raises :class:`TimingError` too: a server that is closing."""
    import selectors

    procs, errs = [], []
    for k, job in enumerate(jobs):
        env = {key: v for key, v in os.environ.items() if not key.startswith("PYTHON")}
        env.update(OMP_NUM_THREADS=str(job["threads"]), OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        errs.append(folder / f"worker{k}.stderr")
        with open(errs[-1], "wb") as err:
            # a session of its own: a Ctrl-C to the terminal's group (or a server's drain) is this process's to act
            # on; it kills them below, and one whose parent is SIGKILLed ends at its next write to the pipe
            procs.append(subprocess.Popen([sys.executable, "-I", str(WORKER)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                          cwd=folder, text=True, start_new_session=True))
    results: list[Any] = [None] * len(jobs)
    done = [0] * len(jobs)
    try:
        sel = selectors.DefaultSelector()
        for k, (proc, job) in enumerate(zip(procs, jobs)):
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            sel.register(proc.stdout, selectors.EVENT_READ, k)
        open_streams, heard = len(procs), time.monotonic()
        while open_streams:
            ready = sel.select(SILENCE_S if stop is None else STOP_POLL_S)
            if stop is not None and stop():
                raise TimingError(f"the {desc} workers were stopped: their caller is closing")
            if not ready:
                if time.monotonic() - heard >= SILENCE_S:
                    raise TimingError(f"a {desc} worker said nothing for {SILENCE_S:.0f} s and was killed")
                continue
            heard = time.monotonic()
            for key, _ in ready:
                k = key.data
                line = procs[k].stdout.readline()
                if not line:
                    sel.unregister(procs[k].stdout)
                    open_streams -= 1
                    continue
                msg = json.loads(line)
                if counter in msg:
                    done[k] = msg[counter]
                    on_progress(sum(done))
                elif "result" in msg:
                    results[k] = msg["result"]
    finally:
        for proc, result in zip(procs, results):
            if proc.poll() is None and result is None:
                proc.kill()
            proc.wait()
    for proc, result, err in zip(procs, results, errs):
        if result is None or proc.returncode:
            tail = err.read_text(errors="replace")[-2000:]
            raise TimingError(f"the {desc} worker exited with code {proc.returncode}: {tail}")
    return results


def describe_cpu() -> str:
    """The CPU's model name (a latency table records the machine it was timed on)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
