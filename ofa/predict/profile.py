"""Profile the machine this runs on into a latency table (``ofa profile``).

Needs torch and the static-subnet code only (plus onnxruntime for that backend), so it
runs on a deployment device. Each distinct block is timed on its own with
``torch.utils.benchmark`` (fixed thread count, warm-up, repeated blocks, median), in a
seeded random order so slow drifts of the machine spread over all entries instead of
biasing one stage.

Backends: ``torch`` runs the modules eagerly; ``onnxruntime`` exports each module to
ONNX (static shapes, opset :data:`~ofa.subnet.ONNX_OPSET`) and times an
``InferenceSession`` on the CPU with ``threads`` intra-op threads, which is how a
subnet fetched as ONNX runs in deployment.
"""
from __future__ import annotations

import gc
import time
from typing import Any, Callable, Mapping, Sequence

import logging

import numpy as np
import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns about a missing CUDA
# toolkit on CPU-only machines; that warning is noise for timing Python modules.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402
from tqdm import tqdm

from ..space import Arch, SearchSpace
from ..subnet import Head, InvertedResidual, build_subnet, export_onnx, make_stem
from .latency import (TABLE_FORMAT, TABLE_VERSION, LatencyPredictor, PlanEntry, describe_cpu, fit_correction,
                      iter_plan, space_digest)

__all__ = ["BACKENDS", "backend_version", "check_backend", "interleaved_latencies",
           "measure_latency", "prepare_run", "profile_space", "reference_arch", "table_run_settings", "time_run"]

BACKENDS = ("torch", "onnxruntime")


def _entry_module(space: SearchSpace, entry: PlanEntry) -> nn.Module:
    if entry.kind == "stem":
        return make_stem(space)
    if entry.kind == "head":
        return Head(space)
    return InvertedResidual(entry.block, space.bn_momentum, space.bn_eps)


def check_backend(backend: str, channels_last: bool = False) -> None:
    """Refuse an unknown backend, a missing onnxruntime, or channels_last outside torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime":
        if channels_last:
            raise ValueError("channels_last applies to the torch backend only")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ValueError("the onnxruntime backend needs the onnxruntime package "
                             "(pip install onnxruntime)") from None


def backend_version(backend: str) -> str:
    if backend == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    return torch.__version__


def prepare_run(module: nn.Module, shape: Sequence[int], batch: int = 1, threads: int = 2,
                channels_last: bool = False, backend: str = "torch") -> Callable[[], Any]:
    """A no-argument callable running one forward of ``module`` on a fixed (batch, *shape) input."""
    check_backend(backend, channels_last)
    module = module.eval()
    x = torch.randn(batch, *shape)
    if backend == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(export_onnx(module, x, dynamic_batch=False), opts,
                                       providers=["CPUExecutionProvider"])
        feed = {"image": x.numpy()}
        return lambda: session.run(None, feed)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    return lambda: module(x)


def check_profile_settings(threads: int = 1, batch: int = 1, rounds: int = 1, min_run_time: float = 1.0,
                           calibrate: int = 0, prefix: str = "--") -> None:
    """Refuse a setting :func:`profile_space` cannot use, naming its flag (``prefix`` + name)."""
    for name, value, ok, allowed in (("threads", threads, threads >= 1, ">= 1"), ("batch", batch, batch >= 1, ">= 1"),
                                     ("rounds", rounds, rounds >= 1, ">= 1"),
                                     ("min-run-time", min_run_time, min_run_time > 0, "> 0"),
                                     ("calibrate", calibrate, calibrate >= 0, ">= 0")):
        if not ok:
            raise ValueError(f"{prefix}{name} must be {allowed}, got {value}")


def table_run_settings(device: Mapping[str, Any]) -> dict[str, Any]:
    """How to time end to end as a table's ``device`` was profiled: ``prepare_run``'s batch, threads,
    channels_last and backend. A backend this package cannot run is checked against torch eager."""
    return {"batch": int(device.get("batch", 1)), "threads": int(device.get("threads", 2)),
            "channels_last": device.get("memory_format") == "channels_last",
            "backend": "onnxruntime" if device.get("backend") == "onnxruntime" else "torch"}


def time_run(run: Callable[[], Any], threads: int = 2, min_run_time: float = 0.2) -> float:
    """Median wall time (ms) of ``run()`` after a warm-up (``torch.utils.benchmark``, blocked autorange)."""
    with torch.inference_mode():
        for _ in range(3):
            run()
        timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads)
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1000.0


def interleaved_latencies(runs: Sequence[Callable[[], Any]], passes: int = 3, threads: int = 2,
                          min_run_time: float = 0.2, progress: bool = False) -> np.ndarray:
    """Time every run once per pass, ``passes`` times over: a (passes, len(runs)) array of ms.

    Interleaving makes a machine that speeds up or slows down during the measurement
    hit every run alike; take the median over axis 0 for one figure per run.
    """
    return np.array([[time_run(run, threads, min_run_time) for run in runs]
                     for _ in tqdm(range(passes), desc="interleaved passes", unit="pass", disable=not progress)])


def measure_latency(module: nn.Module, shape: Sequence[int], batch: int = 1, threads: int = 2,
                    min_run_time: float = 0.2, channels_last: bool = False, backend: str = "torch") -> float:
    """Median wall time (ms) of one forward of ``module`` on a (batch, *shape) input in ``backend``."""
    return time_run(prepare_run(module, shape, batch, threads, channels_last, backend), threads, min_run_time)


def reference_arch(space: SearchSpace) -> Arch:
    """The subnet a table times end to end as its speed reference: a fixed middle one at the top resolution."""
    return space.sample(20201, resolution=max(space.resolutions))


def profile_space(space: SearchSpace, target: str, threads: int = 2, batch: int = 1, seed: int = 0,
                  min_run_time: float = 0.05, channels_last: bool = False, calibrate: int = 10,
                  rounds: int = 3, progress: bool = True, backend: str = "torch") -> dict[str, Any]:
    """Time every distinct block of ``space`` in ``backend`` and return a validated latency table.

    With ``calibrate`` > 0, the smallest and largest subnet at every resolution and
    2 · ``calibrate`` seeded random ones are also timed end to end (``rounds`` interleaved
    passes, median). A correction ``scale · sum + offset`` fitted on the corners and half
    the random ones is kept only if it lowers the error on the other half; kept, it is
    fitted again on all of them.
    """
    check_backend(backend, channels_last)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    plan = list(iter_plan(space, seed))
    runs = {entry.key: prepare_run(_entry_module(space, entry), entry.in_shape, batch, threads, channels_last,
                                   backend)
            for entry in tqdm(plan, desc="export to onnx", unit="block", disable=not progress or backend == "torch")}
    samples: dict[str, list[float]] = {entry.key: [] for entry in plan}
    # Several passes, each in its own random order: a burst of load on the machine
    # spoils one sample of some entries, and the median over passes drops it.
    # The reference subnet, timed end to end before each pass: later re-timings tell how
    # much faster or slower the device runs than while it was profiled.
    ref_arch = reference_arch(space)
    ref_run = prepare_run(build_subnet(space, ref_arch), (space.in_channels, ref_arch.resolution,
                                                          ref_arch.resolution), batch, threads, channels_last, backend)
    ref_ms: list[float] = []
    bar = tqdm(total=rounds * len(plan), desc=f"profile {target}", unit="block", disable=not progress)
    for r in range(rounds):
        ref_ms.append(time_run(ref_run, threads, 0.3))
        order = plan if r == 0 else [plan[i] for i in np.random.default_rng(seed + 100 + r).permutation(len(plan))]
        for entry in order:
            samples[entry.key].append(time_run(runs[entry.key], threads, min_run_time))
            bar.update(1)
    bar.close()
    # The block runners go before anything is timed end to end: an onnxruntime session
    # each, whose idle intra-op threads spin after every call, made the subnets timed
    # below run 1.6x slower than they do alone (measured) and spoiled the correction.
    runs.clear()
    gc.collect()
    entries = {k: round(float(np.median(v)), 6) for k, v in samples.items()}
    table = {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "target": target,
        "space": {"name": space.name, "digest": space_digest(space)},
        "device": {
            "cpu": describe_cpu(), "threads": threads, "batch": batch, "backend": backend,
            "backend_version": backend_version(backend), "memory_format": "channels_last" if channels_last else "nchw",
            "rounds": rounds, "min_run_time_s": min_run_time,
        },
        "entries": entries,
        "correction": {"scale": 1.0, "offset_ms": 0.0},
    }
    if calibrate:
        # The corners pin both ends of the fitted line; a line fitted on a few random
        # subnets alone, whose sums span a narrow range, took its slope from their noise.
        corners = [f(r) for r in space.resolutions for f in (space.smallest, space.largest)]
        archs = corners + space.sample(np.random.default_rng(seed + 1), n=2 * calibrate)
        torch.manual_seed(seed)
        e2e = [prepare_run(build_subnet(space, a), (space.in_channels, a.resolution, a.resolution), batch, threads,
                           channels_last, backend)
               for a in tqdm(archs, desc="end-to-end: prepare", unit="subnet", disable=not progress)]
        measured = np.median(interleaved_latencies(e2e, rounds, threads, 0.3, progress), axis=0)
        e2e.clear()
        gc.collect()
        ref_ms.append(time_run(ref_run, threads, 0.3))
        raw = LatencyPredictor(space, table).raw(space.encode(archs))
        fit, check = slice(0, len(corners) + calibrate), slice(len(corners) + calibrate, None)
        scale, offset = fit_correction(raw[fit], measured[fit])
        err_raw = np.abs(raw[check] / measured[check] - 1).mean()
        err_fit = np.abs((raw[check] * scale + offset) / measured[check] - 1).mean()
        if err_fit < err_raw:
            scale, offset = fit_correction(raw, measured)  # the form is chosen: every timing now
            table["correction"] = {"scale": round(scale, 6), "offset_ms": round(offset, 6)}
        # the corners again later tell the device's drift, with the reference
        table["references"] = [{"arch": a.to_dict(), "ms": round(float(m), 6)} for a, m in zip(corners, measured)]
        table["calibration"] = {"archs": len(archs), "checked": calibrate, "rounds": rounds,
                                "mean_abs_rel_error_raw": round(float(err_raw), 4),
                                "mean_abs_rel_error_corrected": round(float(err_fit), 4),
                                "kept": bool(err_fit < err_raw)}
    table["reference"] = {"arch": ref_arch.to_dict(), "ms": round(float(np.median(ref_ms)), 6)}
    table["profile_seconds"] = round(time.perf_counter() - t0, 1)
    return table
