"""The one timing protocol behind every latency figure: profiles, reports, recalibration, benchmarks.

Networks are timed in a worker process that imports only the runtime being timed
(:mod:`ofa.predict._timer`), never in the process that trained, evaluated or exported
them: torch's thread pool beside onnxruntime made it run 1.3-2.4x slower (PERF.md).
The worker fixes the thread count, warms every network up, gives each sample as many
calls as fill ``sample_ms`` (short networks need many calls), and interleaves the
networks in ``rounds`` passes of seeded random order, so that a machine speeding up or
slowing down hits all of them alike. The figure kept per network is the
:data:`STATISTIC` of its samples; the rounds split in two halves give two independent
timings, whose agreement is the protocol's own repeatability, and a machine too noisy
to trust is said so (:meth:`Timings.repeatability`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..space import Arch, BlockSpec, SearchSpace

__all__ = ["BACKENDS", "NoisyTiming", "Part", "STATISTIC", "Timing", "TimingError", "Timings", "spearman",
           "subnet_part", "time_parts", "time_parts_trusted"]

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch")
STATISTIC = "median over passes of the fastest sample, at the median machine speed"  # docs/latency.md
WINDOW = 24          # networks around each timing that measure the machine's speed then
NOISY_SCATTER = 0.05  # the halves of the rounds disagree by more than this per network, drift aside: noisy
SILENCE_S = 900.0     # a worker that reports nothing for this long is stuck and is killed


class TimingError(RuntimeError):
    """The timing worker failed or hung; the message says how and ends with its stderr."""


class NoisyTiming(TimingError):
    """Every attempt of :func:`time_parts_trusted` failed the protocol's own repeatability check; ``timings``
    is the last (a caller that accepts noise must say it used an untrusted run)."""

    def __init__(self, message: str, timings: "Timings") -> None:
        super().__init__(message)
        self.timings = timings


@dataclass(frozen=True)
class Timing:
    """Where and how to time: the runtime and its settings, and the protocol's sizes."""

    backend: str = "onnxruntime"
    threads: int = 2
    batch: int = 1
    channels_last: bool = False    # torch only
    rounds: int = 6                # interleaved passes over all networks
    samples: int = 2               # samples per network and pass
    sample_ms: float = 10.0        # each sample runs as many calls as fill this
    warmup_ms: float = 20.0        # once per network before the first pass
    seed: int = 0

    def check(self) -> "Timing":
        """Refuse settings the worker cannot use, naming the field and what is allowed."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.channels_last and self.backend != "torch":
            raise ValueError("channels_last applies to the torch backend only")
        for name, low in (("threads", 1), ("batch", 1), ("rounds", 2), ("samples", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("sample_ms", "warmup_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.backend == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                raise ValueError("the onnxruntime backend needs the onnxruntime package "
                                 "(pip install onnxruntime)") from None
        return self

    def protocol(self) -> dict[str, Any]:
        """The sizes a latency table records about how it was timed."""
        return {"rounds": self.rounds, "samples": self.samples, "sample_ms": self.sample_ms,
                "warmup_ms": self.warmup_ms, "statistic": STATISTIC}

    def replace(self, **changes: Any) -> "Timing":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Part:
    """One network to time: a ``subnet`` of ``arch``, the ``stem``, one ``block`` or the ``head``, a served
    ``file`` (ONNX for onnxruntime, safetensors for torch), or torchvision's ``mobilenet_v3_small`` at
    ``width_mult`` (the report's baseline). ``shape`` is its input (C, H, W)."""

    kind: str
    shape: tuple[int, int, int]
    arch: Arch | None = None
    block: BlockSpec | None = None
    file: str | None = None
    width_mult: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """What the torch worker builds it from (see :func:`module_of`)."""
        return {"kind": self.kind, "arch": self.arch.to_dict() if self.arch else None,
                "block": dataclasses.asdict(self.block) if self.block else None, "width_mult": self.width_mult}


def module_of(space: SearchSpace, part: Mapping[str, Any]):
    """A randomly initialised torch module for a part's :meth:`Part.to_dict` (its weights do not change its
    time): the one place that decides what a part is, for the ONNX export here and the torch worker."""
    if part["kind"] == "mobilenet_v3_small":
        from ..subnet import mobilenet_v3_small_baseline

        return mobilenet_v3_small_baseline(part["width_mult"], space.in_channels, space.num_classes)
    from ..subnet import build_part

    return build_part(space, part["kind"], part.get("arch"), part.get("block"))


def subnet_part(space: SearchSpace, arch: Arch, file: str | None = None) -> Part:
    """The :class:`Part` of ``arch`` (a served ``file`` of it, if given)."""
    shape = (space.in_channels, arch.resolution, arch.resolution)
    return Part("file", shape, arch, file=file) if file else Part("subnet", shape, arch)


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

    @property
    def ms(self) -> np.ndarray:
        """One figure per network (the :data:`STATISTIC`)."""
        return statistic(self.samples_ms, self.orders)

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


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


EXPORT_PROCESSES = 2  # the TorchScript exporter is single-threaded Python: two processes halve the wait


def _worker_items(space: SearchSpace | None, parts: Sequence[Part], timing: Timing, folder: Path,
                  progress: bool) -> list[dict[str, Any]]:
    """What the worker loads: ONNX files for onnxruntime (exported here), specs or served files for torch."""
    items: list[dict[str, Any]] = []
    exports = []
    for i, part in enumerate(parts):
        shape = [timing.batch, *part.shape]
        if part.kind == "file":  # a served file, in the format the backend runs (ofa.export.run_format)
            items.append({"shape": shape, "file": str(Path(part.file).resolve())})
        elif timing.backend == "onnxruntime":
            items.append({"shape": shape, "file": str(folder / f"{i}.onnx")})
            exports.append((part.to_dict(), shape, items[-1]["file"], timing.seed * 1_000_003 + i))
        else:
            items.append({"shape": shape, "part": part.to_dict()})
    if exports:
        n = min(EXPORT_PROCESSES, os.cpu_count() or 1, len(exports))
        sp = space.to_dict() if space is not None else None
        jobs = [{"export": exports[k::n], "threads": 1, "space": sp, "root": _package_root()} for k in range(n)]
        _run_workers(jobs, folder, progress, "export to onnx", len(exports), "exported")
    return items


def _run_workers(jobs: Sequence[Mapping[str, Any]], folder: Path, progress: bool, desc: str, total: int,
                 counter: str) -> list[Any]:
    """Run each job in its own worker process, side by side; their results (a worker that fails, or says
    nothing for :data:`SILENCE_S`, raises :class:`TimingError` with its stderr)."""
    import selectors

    from tqdm import tqdm

    procs, errs = [], []
    for k, job in enumerate(jobs):
        env = {key: v for key, v in os.environ.items() if not key.startswith("PYTHON")}
        env.update(OMP_NUM_THREADS=str(job["threads"]), OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        errs.append(folder / f"worker{k}.stderr")
        with open(errs[-1], "wb") as err:
            procs.append(subprocess.Popen([sys.executable, "-I", str(Path(__file__).with_name("_timer.py"))],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                          cwd=folder, text=True))
    bar = tqdm(total=total, desc=desc, unit="net", disable=not progress)
    results: list[Any] = [None] * len(jobs)
    done = [0] * len(jobs)
    try:
        sel = selectors.DefaultSelector()
        for k, (proc, job) in enumerate(zip(procs, jobs)):
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            sel.register(proc.stdout, selectors.EVENT_READ, k)
        open_streams = len(procs)
        while open_streams:
            ready = sel.select(SILENCE_S)
            if not ready:
                raise TimingError(f"a {desc} worker said nothing for {SILENCE_S:.0f} s and was killed")
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
                    bar.update(sum(done) - bar.n)
                elif "result" in msg:
                    results[k] = msg["result"]
    finally:
        bar.close()
        for proc, result in zip(procs, results):
            if proc.poll() is None and result is None:
                proc.kill()
            proc.wait()
    for proc, result, err in zip(procs, results, errs):
        if result is None or proc.returncode:
            tail = err.read_text(errors="replace")[-2000:]
            raise TimingError(f"the {desc} worker exited with code {proc.returncode}: {tail}")
    return results


def time_parts(space: SearchSpace | None, parts: Sequence[Part], timing: Timing, progress: bool = False,
               desc: str = "timing") -> Timings:
    """Time every part with the protocol in a fresh worker process; see the module docstring."""
    timing.check()
    if not parts:
        raise ValueError("nothing to time")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ofa-timing-") as tmp:
        folder = Path(tmp)
        job = {**dataclasses.asdict(timing), "items": _worker_items(space, parts, timing, folder, progress),
               "space": space.to_dict() if space is not None else None, "root": _package_root()}
        (result,) = _run_workers([job], folder, progress, desc, len(parts) * timing.rounds, "done")
    timings = Timings(np.array(result["times_ms"]), tuple(result["calls"]), time.perf_counter() - t0,
                      np.array(result["orders"]))
    rep = timings.repeatability()
    if not rep["trusted"]:
        log.warning("%s", rep["verdict"])
    return timings


def time_parts_trusted(space: SearchSpace | None, parts: Sequence[Part], timing: Timing, progress: bool = False,
                       desc: str = "timing", attempts: int = 3, say=log.warning) -> Timings:
    """:func:`time_parts`, timed again with twice the rounds while the protocol's repeatability check calls the
    run too noisy to trust; :class:`NoisyTiming` when ``attempts`` runs all failed it. A gate for figures
    that decide an answer (a device's speed now, a served subnet's latency): an untrusted run is never
    used silently."""
    for attempt in range(1, attempts + 1):
        timings = time_parts(space, parts, timing, progress, desc)
        rep = timings.repeatability()
        if rep["trusted"]:
            return timings
        if attempt < attempts:
            say(f"{desc}: {rep['verdict']}; timing again with {2 * timing.rounds} rounds "
                f"(attempt {attempt + 1} of {attempts})")
            timing = timing.replace(rounds=2 * timing.rounds)
    raise NoisyTiming(f"{desc}: {attempts} attempts, the last with {timing.rounds} rounds, and {rep['verdict']}",
                      timings)
