"""The one timing protocol behind every latency figure: profiles, reports, recalibration, benchmarks.

Networks are timed in a worker process that imports only the runtime being timed
(:mod:`ofa_client._timer`), never in the process that trained, evaluated or exported
them: torch's thread pool beside onnxruntime made it run 1.3-2.4x slower (PERF.md).
The protocol's numpy half (the worker, the statistic, the repeatability check) is
:mod:`ofa_client.timing`, so that a device with only the light client times with the
same code (``ofa-client profile``); this module adds what needs the library: the parts
to time (blocks, subnets, served files, the baseline) and their export to ONNX.
A machine too noisy to trust is said so (:meth:`Timings.repeatability`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ofa_client._timer import ONNX_RUNTIMES
from ofa_client.timing import (NOISY_SCATTER, PRECISIONS, STATISTIC, TimingError, Timings, check_sizes, machine_speed,
                               run_workers, spearman, statistic)

from ..space import Arch, BlockSpec, SearchSpace
from .latency import SPEED_TOLERANCE

__all__ = ["BACKENDS", "NOISY_SCATTER", "ONNX_BACKENDS", "NoisyTiming", "Part", "STATISTIC", "Timing", "TimingError", "Timings",
           "export_folder", "machine_speed", "spearman", "statistic", "subnet_part", "time_parts", "time_parts_agreed",
           "time_parts_trusted"]

log = logging.getLogger(__name__)

ONNX_BACKENDS = ONNX_RUNTIMES  # the runtimes that run ONNX files (exported here)
BACKENDS = (*ONNX_BACKENDS, "torch")


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
    precision: str = "fp32"        # int8: every network quantized as the backend's served int8 file is (ofa.export)
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
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "fp32":
            from ..export import run_format, writable

            writable(run_format(self.backend, self.precision))  # ValueErrors name the pairs, or the package
        check_sizes(self.threads, self.batch, self.rounds, self.samples, self.sample_ms, self.warmup_ms)
        if self.backend in ONNX_BACKENDS:
            if importlib.util.find_spec(self.backend) is None:
                raise ValueError(f"the {self.backend} backend needs the {self.backend} package "
                                 f"(pip install {self.backend})")
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
        """What the torch worker builds it from (see :func:`ofa.subnet.module_of`)."""
        return {"kind": self.kind, "arch": self.arch.to_dict() if self.arch else None,
                "block": dataclasses.asdict(self.block) if self.block else None, "width_mult": self.width_mult}


def subnet_part(space: SearchSpace, arch: Arch, file: str | None = None) -> Part:
    """The :class:`Part` of ``arch`` (a served ``file`` of it, if given)."""
    shape = (space.in_channels, arch.resolution, arch.resolution)
    return Part("file", shape, arch, file=file) if file else Part("subnet", shape, arch)


def _run_workers(jobs: Sequence[Mapping[str, Any]], folder: Path, progress: bool, desc: str, total: int,
                 counter: str, stop: Callable[[], bool] | None = None) -> list[Any]:
    """:func:`ofa_client.timing.run_workers` with a progress bar."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="net", disable=not progress) as bar:
        return run_workers(jobs, folder, desc, counter, lambda done: bar.update(done - bar.n), stop)


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


EXPORT_PROCESSES = 2  # the TorchScript exporter is single-threaded Python: two processes halve the wait
# at most this many networks are exported in the calling process: a worker's start (torch's import, ~1.8 s here)
# was most of its time for 1-27 exports (~0.03 s a block, ~0.2 s a subnet; PERF.md)
IN_PROCESS_EXPORTS = 12


def _export_name(space: SearchSpace | None, part: Part, shape: list[int], timing: Timing) -> tuple[str, int]:
    """A part's ONNX file name in an export folder, and the seed of its random weights: both from what the
    export depends on in one process (the space, whose stem, head and widths the part is built with; the part;
    its input; the runtime and precision; the protocol's seed), so that a pass or attempt of the same timing
    finds the network already exported."""
    key = json.dumps([space.to_dict() if space is not None else None, part.to_dict(), shape, timing.backend,
                      timing.precision, timing.seed], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{digest[:24]}.onnx", int(digest[24:32], 16)


@contextlib.contextmanager
def export_folder(exported: Path | None = None) -> Iterator[Path]:
    """``exported``, or a temporary folder for one run's ONNX exports (removed after it)."""
    if exported is not None:
        yield exported
        return
    with tempfile.TemporaryDirectory(prefix="ofa-exports-") as tmp:
        yield Path(tmp)


def _export_all(space: SearchSpace | None, exports: list[tuple[Any, ...]], timing: Timing, progress: bool,
                in_process: int, stop: Callable[[], bool] | None = None) -> None:
    """:func:`ofa.export.export_parts` here for at most ``in_process`` fp32 exports, else in worker processes side
    by side. int8 is always quantized in workers: the quantizers change process-wide state (NNCF's logging, the
    root logger's handlers) that a caller's process should not inherit. A failure is a :class:`TimingError`
    either way; so is ``stop()`` turning true while workers export."""
    if len(exports) <= in_process and timing.precision == "fp32":
        from ..export import export_parts

        try:
            export_parts(space, exports, timing.backend, timing.precision)
        except (RuntimeError, ValueError, OSError) as e:  # torch's exporter, a full disk
            raise TimingError(f"export to onnx failed: {type(e).__name__}: {str(e)[-2000:]}") from e
        return
    n = min(EXPORT_PROCESSES, os.cpu_count() or 1, len(exports))
    sp = space.to_dict() if space is not None else None
    jobs = [{"export": exports[k::n], "threads": 1, "space": sp, "root": _package_root(),
             "precision": timing.precision, "backend": timing.backend} for k in range(n)]
    with tempfile.TemporaryDirectory(prefix="ofa-export-") as logs:  # not in ``folder``: it may be a kit's
        _run_workers(jobs, Path(logs), progress, "export to onnx", len(exports), "exported", stop)


def _worker_items(space: SearchSpace | None, parts: Sequence[Part], timing: Timing, folder: Path,
                  progress: bool, exported: Path | None = None, in_process: int = IN_PROCESS_EXPORTS,
                  stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """What the worker loads: ONNX files for the ONNX runtimes, specs or served files for torch. The ONNX files
    are exported into ``folder``, each written anew; or into ``exported``, a folder one caller keeps for the
    timings of one run, where a file exported before is used as it is. Up to ``in_process`` of them are exported
    in this process (:func:`_export_all`); a server's thread passes 0: exporting holds the interpreter (and so
    :func:`time_parts` and the functions built on it, which export in the caller's process, are for a CLI's or a
    job's process, never a server's)."""
    items: list[dict[str, Any]] = []
    exports, queued = [], set()
    out = Path(exported or folder).resolve()
    for part in parts:
        shape = [timing.batch, *part.shape]
        if part.kind == "file":  # a served file, in the format the backend runs (ofa.export.run_format)
            items.append({"shape": shape, "file": str(Path(part.file).resolve())})
        elif timing.backend in ONNX_BACKENDS:
            name, seed = _export_name(space, part, shape, timing)
            path = out / name
            items.append({"shape": shape, "file": str(path)})
            if not (exported is not None and path.exists()) and path not in queued:
                queued.add(path)
                exports.append((part.to_dict(), shape, str(path), seed))
        else:
            items.append({"shape": shape, "part": part.to_dict()})
    if exports:
        _export_all(space, exports, timing, progress, in_process, stop)
    return items


def time_parts(space: SearchSpace | None, parts: Sequence[Part], timing: Timing, progress: bool = False,
               desc: str = "timing", exported: Path | None = None) -> Timings:
    """Time every part with the protocol in a fresh worker process; see the module docstring. ``exported``:
    a folder the caller keeps for one run's timings, where the ONNX exports are found again by its other
    passes (:func:`_worker_items`)."""
    timing.check()
    if not parts:
        raise ValueError("nothing to time")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ofa-timing-") as tmp:
        folder = Path(tmp)
        job = {**dataclasses.asdict(timing), "items": _worker_items(space, parts, timing, folder, progress, exported),
               "space": space.to_dict() if space is not None else None, "root": _package_root()}
        (result,) = _run_workers([job], folder, progress, desc, len(parts) * timing.rounds, "done")
    timings = Timings(np.array(result["times_ms"]), tuple(result["calls"]), time.perf_counter() - t0,
                      np.array(result["orders"]))
    rep = timings.repeatability()
    if not rep["trusted"]:
        log.warning("%s", rep["verdict"])
    return timings


def time_parts_agreed(space: SearchSpace | None, parts: Sequence[Part], timing: Timing, progress: bool = False,
                      desc: str = "timing", say=log.warning, exported: Path | None = None) -> Timings:
    """:func:`time_parts_trusted`, then a second pass in a fresh worker, joined into one run whose statistic
    takes the machine at its median speed over all their rounds; where the two passes' levels (the median
    ratio of their figures) differ by more than :data:`SPEED_TOLERANCE`, a third pass joins them. For a
    device's speed now: one pass's level moved by up to 9% between passes minutes apart here (sd about 4%,
    docs/demo.md), which a pass's own repeatability check, within the pass, cannot see. Only the first pass
    gates (as :func:`time_parts_trusted` does); a later pass its own check calls noisy is left out, said.
    The networks are exported once for all passes (into ``exported`` when given)."""
    with export_folder(exported) as folder:
        return _agreed(space, parts, timing, progress, desc, say, folder)


def _agreed(space: SearchSpace | None, parts: Sequence[Part], timing: Timing, progress: bool, desc: str, say,
            exported: Path) -> Timings:
    """:func:`time_parts_agreed`, its networks exported into ``exported``."""
    passes = [time_parts_trusted(space, parts, timing, progress, f"{desc} (pass 1)", say=say, exported=exported)]

    def another(k: int) -> bool:
        more = time_parts(space, parts, timing, progress, f"{desc} (pass {k})", exported)
        rep = more.repeatability()
        if rep["trusted"]:
            passes.append(more)
        else:
            say(f"{desc}: pass {k} left out: {rep['verdict']}")
        return rep["trusted"]

    if another(2):
        level = float(np.median(passes[1].ms / passes[0].ms))
        if abs(level - 1) > SPEED_TOLERANCE:
            say(f"{desc}: the second pass ran at x{level:.3f} of the first; a third pass decides")
            another(3)
    return Timings(np.concatenate([t.samples_ms for t in passes], axis=1), passes[0].calls,
                   sum(t.seconds for t in passes), np.concatenate([t.orders for t in passes], axis=0),
                   tuple(len(t.orders) for t in passes))


def time_parts_trusted(space: SearchSpace | None, parts: Sequence[Part], timing: Timing, progress: bool = False,
                       desc: str = "timing", attempts: int = 3, say=log.warning,
                       exported: Path | None = None) -> Timings:
    """:func:`time_parts`, timed again with twice the rounds while the protocol's repeatability check calls the
    run too noisy to trust; :class:`NoisyTiming` when ``attempts`` runs all failed it. A gate for figures
    that decide an answer (a device's speed now, a served subnet's latency): an untrusted run is never
    used silently. The networks are exported once for all attempts (into ``exported`` when given)."""
    with export_folder(exported) as folder:
        for attempt in range(1, attempts + 1):
            timings = time_parts(space, parts, timing, progress, desc, folder)
            rep = timings.repeatability()
            if rep["trusted"]:
                return timings
            if attempt < attempts:
                say(f"{desc}: {rep['verdict']}; timing again with {2 * timing.rounds} rounds "
                    f"(attempt {attempt + 1} of {attempts})")
                timing = timing.replace(rounds=2 * timing.rounds)
    raise NoisyTiming(f"{desc}: {attempts} attempts, the last with {timing.rounds} rounds, and {rep['verdict']}",
                      timings)
