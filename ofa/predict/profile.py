"""Profile the machine this runs on into a latency table (``ofa profile``), and re-time it later.

Needs torch and the static-subnet code only (plus onnxruntime for that backend), so it
runs on a deployment device. Every distinct block of the space, and subnets timed end
to end, are timed together by the one protocol of :mod:`ofa.predict.timing` (a worker
process that imports only the runtime, interleaved passes, a robust statistic); the
model that turns block sums into end-to-end predictions is fitted on most of those
subnets, chosen by cross-validation, and checked on the rest
(:mod:`ofa_client.latency_model`).

Backends: ``onnxruntime`` (the default) exports each network to ONNX (static shapes,
opset :data:`~ofa.export.ONNX_OPSET`) exactly as a subnet fetched with ``--format
onnx`` is exported, and times an ``InferenceSession`` on the CPU; ``torch`` runs the
modules eagerly, which at batch 1 on small images measures Python dispatch as much as
the network.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from ..space import Arch, SearchSpace, space_digest
from .latency import TABLE_FORMAT, TABLE_VERSION, LatencyPredictor, Speed, describe_cpu, iter_plan
from ofa_client.latency_model import fit_and_check, identity_model
from .timing import BACKENDS, NoisyTiming, Part, Timing, Timings, subnet_part, time_parts, time_parts_agreed

__all__ = ["backend_version", "check_profile", "e2e_archs", "held_out_mask", "profile_space", "recalibrate",
           "reference_archs", "reference_timings", "speed_of", "timing_of_table"]


def backend_version(backend: str) -> str:
    """The installed version of a timing backend (a table records it)."""
    from importlib.metadata import version

    return version(backend)


def reference_archs(space: SearchSpace, n: int = 10, seed: int = 0) -> list[Arch]:
    """The subnets a table times end to end as its speed references: the corners at the lowest and
    highest resolution, then seeded random ones, ``n`` in all (HELP adapts from 10 such timings)."""
    lo, hi = min(space.resolutions), max(space.resolutions)
    chosen: dict[str, Arch] = {}
    for arch in (space.smallest(lo), space.largest(hi), space.largest(lo), space.smallest(hi)):
        chosen.setdefault(arch.id, arch)
    rng = np.random.default_rng([seed, 20201])
    while len(chosen) < n:
        arch = space.sample(rng)
        chosen.setdefault(arch.id, arch)
    return list(chosen.values())[:n]


def held_out_mask(n_archs: int, n_refs: int, held_out: float, seed: int) -> np.ndarray:
    """Which of a profile's end-to-end subnets are held out to check the model: a seeded ``held_out`` share of
    the random ones (the references, which include the corners, are always fitted on)."""
    n_random = n_archs - n_refs
    held = np.zeros(n_archs, bool)
    held[n_refs + np.random.default_rng([seed, 2]).permutation(n_random)[: int(round(held_out * n_random))]] = True
    return held


def e2e_archs(space: SearchSpace, refs: list[Arch], subnets: int, seed: int) -> list[Arch]:
    """The references, then ``subnets`` seeded random subnets: what a profile times end to end."""
    chosen = {a.id: a for a in refs}
    rng = np.random.default_rng([seed, 1])
    target = len(refs) + subnets
    while len(chosen) < target:
        arch = space.sample(rng)
        chosen.setdefault(arch.id, arch)
    return list(chosen.values())


def check_profile(subnets: int = 0, held_out: float = 0.0, references: int = 1) -> None:
    """Refuse sizes :func:`profile_space` cannot use, naming the field."""
    if not 1 <= references <= 64:
        raise ValueError(f"references must be in 1..64, got {references}")
    if subnets < 0:
        raise ValueError(f"subnets must be >= 0, got {subnets}")
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out must be in [0, 1), got {held_out}")


def profile_space(space: SearchSpace, target: str, timing: Timing = Timing(), subnets: int = 80,
                  held_out: float = 0.25, references: int = 10, seed: int = 0,
                  progress: bool = True) -> dict[str, Any]:
    """Time every distinct block of ``space`` and ``references`` + ``subnets`` subnets end to end in one
    interleaved run; fit the end-to-end model on all but ``held_out`` of the random subnets; return the
    validated table (see :mod:`ofa.predict.latency` for its format)."""
    timing.check()
    check_profile(subnets, held_out, references)
    t0 = time.perf_counter()
    plan = list(iter_plan(space, seed))
    refs = reference_archs(space, references, seed)
    from ..export import run_format  # torch: imported when a profile runs

    e2e = e2e_archs(space, refs, subnets, seed)
    parts = ([Part(e.kind, e.in_shape, block=e.block) for e in plan] + [subnet_part(space, a) for a in e2e])
    timings = time_parts(space, parts, timing.replace(seed=seed), progress, desc=f"profile {target}")
    ms = timings.ms
    table: dict[str, Any] = {
        "format": TABLE_FORMAT, "version": TABLE_VERSION, "target": target,
        "space": {"name": space.name, "digest": space_digest(space)},
        "device": {"cpu": describe_cpu(), "threads": timing.threads, "batch": timing.batch,
                   "backend": timing.backend, "backend_version": backend_version(timing.backend),
                   "memory_format": "channels_last" if timing.channels_last else "nchw",
                   "precision": timing.precision, "weights_format": run_format(timing.backend, timing.precision)},
        "timing": {**timing.protocol(), "repeatability": timings.repeatability()},
        "entries": {e.key: round(float(m), 6) for e, m in zip(plan, ms[: len(plan)])},
        "model": identity_model(space.num_stages, space.resolutions),
    }
    e2e_ms = ms[len(plan):]
    table["references"] = [{"arch": a.to_dict(), "ms": round(float(m), 6)} for a, m in zip(refs, e2e_ms)]
    table["fit"] = _fit(space, table, e2e, e2e_ms, len(refs), held_out, seed)
    table["profile_seconds"] = round(time.perf_counter() - t0, 1)
    return table


def _fit(space: SearchSpace, table: dict[str, Any], archs: list[Arch], measured: np.ndarray, n_refs: int,
         held_out: float, seed: int) -> dict[str, Any]:
    """Choose and fit the model into ``table`` (held-out subnets: random ones only; the references,
    which include the corners, are always fitted on); return the ``fit`` record."""
    x = LatencyPredictor(space, table).features(space.encode(archs))
    held = held_out_mask(len(archs), n_refs, held_out, seed)
    table["model"], fit = fit_and_check(x, measured, held, space.num_stages, space.resolutions, seed)
    return fit


def timing_of_table(table: Mapping[str, Any], **changes: Any) -> Timing:
    """The timing a table was profiled with: its device's runtime and settings, its protocol's sizes."""
    dev, protocol = table["device"], table.get("timing") or {}
    backend = dev.get("backend")
    if backend not in BACKENDS:
        raise ValueError(f"the table of target {table['target']!r} was profiled with backend {str(backend)[:40]!r}, "
                         f"which this package cannot run; it times {list(BACKENDS)}")
    sizes = {k: protocol[k] for k in ("rounds", "samples", "sample_ms", "warmup_ms") if k in protocol}
    return Timing(backend=backend, threads=int(dev.get("threads", 2)), batch=int(dev.get("batch", 1)),
                  channels_last=dev.get("memory_format") == "channels_last", precision=dev.get("precision", "fp32"),
                  **{**sizes, **changes}).check()


def reference_timings(space: SearchSpace, table: Mapping[str, Any], timings: Timings) -> dict[str, Any]:
    """The references' timings as a search request carries them (``reference_timings`` of the API)."""
    refs, passes = LatencyPredictor(space, table).references, timings.pass_ms()
    one = len(passes) == 1  # the timings of each pass, with its index (the server's measure of the speed's spread)
    return {"target": table["target"], "measured_at": (table.get("recalibration") or {}).get("measured_at"),
            "reference_timings": [{"subnet_id": a.id, "ms": round(float(m), 6), **({} if one else {"pass_index": k})}
                                  for k, ms in enumerate(passes) for (a, _), m in zip(refs, ms)]}


def speed_of(now_ms: np.ndarray | Sequence[np.ndarray], profiled_ms: np.ndarray,
             check: bool = True) -> tuple[list[float], Speed]:
    """How the device runs now against when profiled: each reference's ratio (its median over passes), and the
    :class:`Speed` fitted on them (one subnet's re-timing is a noisy estimate of the device's speed; ten are
    not). ``now_ms``: one figure per reference, or one such array per pass (:meth:`Timings.pass_ms`), whose
    disagreement the speed carries as its ``spread``. With ``check``, a speed beyond what a table may record
    (:meth:`Speed.check_range`) is a ValueError that says to profile again."""
    p = np.asarray(profiled_ms, float)
    passes = [np.asarray(now_ms, float)] if np.ndim(now_ms) == 1 else [np.asarray(m, float) for m in now_ms]
    ratios = np.median([m / p for m in passes], axis=0)
    speed = Speed.fit_passes(np.tile(p, len(passes)), np.concatenate(passes), np.repeat(np.arange(len(passes)), len(p)))
    if check:
        try:
            speed.check_range(p)
        except ValueError as e:
            raise ValueError(f"the re-timed references {e}: profile this target again on its device "
                             f"(`ofa profile`)") from None
    return [round(float(r), 5) for r in ratios], speed


def recalibrate(space: SearchSpace, table: Mapping[str, Any], progress: bool = True,
                rounds: int = 12, accept_noisy: bool = False) -> tuple[dict[str, Any], Timings]:
    """Re-time the table's references on this device now, in passes that agree on the machine's level
    (:func:`~ofa.predict.timing.time_parts_agreed`); the table with its ``recalibration`` set to the
    :class:`Speed` fitted on them (seconds of work: ten subnets), and the timings. A run the protocol's
    repeatability check calls too noisy is timed again with more rounds, then refused
    (:class:`~ofa.predict.timing.NoisyTiming`), or with ``accept_noisy`` used, its verdict recorded."""
    pred = LatencyPredictor(space, table)
    refs = pred.references
    if not refs:
        raise ValueError(f"the table of target {table['target']!r} has no reference subnets to re-time; "
                         "profile it again")
    timing = timing_of_table(table, rounds=rounds)
    parts = [subnet_part(space, a) for a, _ in refs]
    try:
        timings = time_parts_agreed(space, parts, timing, progress, desc="re-time references")
    except NoisyTiming as e:
        if not accept_noisy:
            raise
        timings = e.timings
    ratios, speed = speed_of(timings.pass_ms(), np.array([m for _, m in refs]))
    recal = {**speed.to_dict(), "ratios": ratios,
             "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "repeatability": timings.repeatability()}
    return {**table, "recalibration": recal}, timings
