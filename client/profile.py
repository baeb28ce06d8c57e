"""A device becomes a target with only the light client: time a profiling kit, fit, make a latency table.

A kit (``ofa profile --kit DIR`` writes one) holds the ONNX files of a space's distinct blocks and of
subnets timed end to end, and ``kit.json``: the space, each file's sha256 and input shape, and for
each subnet how its model features are made from the blocks' times. :func:`profile_kit` times them all
with the one protocol (:mod:`ofa_client.timing`, the worker :mod:`ofa_client._timer`: the code
``ofa profile`` uses), fits the end-to-end model (:mod:`ofa_client.latency_model`) on most subnets and
checks it on the rest, and returns the table, which ``Client.register_target`` uploads. Needs numpy and
the runtime timed (``pip install 'ofa-client[onnx]'``), no torch.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ._timer import ONNX_RUNTIMES
from .latency_model import fit_and_check
from .timing import STATISTIC, Timings, check_sizes, describe_cpu, run_workers

__all__ = ["KIT_FORMAT", "KIT_VERSION", "KitError", "RUNTIMES", "profile_kit", "read_kit"]

KIT_FORMAT, KIT_VERSION, KIT_MANIFEST = "ofa-profile-kit", 1, "kit.json"
RUNTIMES = ONNX_RUNTIMES  # each reads the kit's ONNX files


class KitError(ValueError):
    """The kit is not one this client reads, or its files are not the ones its manifest names."""


def read_kit(folder: str | Path) -> dict[str, Any]:
    """The kit's manifest, its format checked and every file's sha256 verified."""
    folder = Path(folder)
    try:
        kit = json.loads((folder / KIT_MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise KitError(f"{folder} is not a profiling kit ({KIT_MANIFEST}: {e})") from None
    if not isinstance(kit, dict) or (kit.get("format"), kit.get("version")) != (KIT_FORMAT, KIT_VERSION):
        raise KitError(f"{folder}: not a {KIT_FORMAT!r} version {KIT_VERSION} kit")
    for key in ("entries", "subnets"):
        items = kit.get(key)
        if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("file"), str) and isinstance(i.get("sha256"), str)
                for i in items):
            raise KitError(f"{folder}: {KIT_MANIFEST}'s {key} must be a list of {{\"file\", \"sha256\", ...}}")
    root = folder.resolve()
    for item in kit["entries"] + kit["subnets"]:
        path = (folder / item["file"]).resolve()
        if root not in path.parents:
            raise KitError(f"{folder}: {item['file']!r} points outside the kit")
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            raise KitError(f"{folder}: {item['file']} cannot be read: {e.strerror}") from None
        if digest != item["sha256"]:
            raise KitError(f"{folder}: {item['file']} does not match its sha256 in {KIT_MANIFEST}")
    return kit


def _features(kit: Mapping[str, Any], entries: Mapping[str, float]) -> np.ndarray:
    """The model's features of the kit's subnets from the blocks' times (the server's
    ``LatencyPredictor.features``): fixed parts, each stage's sum, the block count, one column per resolution."""
    resolutions = list(kit["space"]["resolutions"])
    rows = []
    for s in kit["subnets"]:
        f = s["features"]
        onehot = np.eye(len(resolutions))[resolutions.index(f["resolution"])]
        rows.append([sum(entries[k] for k in f["fixed"]), *[sum(entries[k] for k in keys) for keys in f["stages"]],
                     f["blocks"], *onehot])
    return np.array(rows, float)


def _fit(kit: Mapping[str, Any], x: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model (a table's ``model``) fitted on the subnets not held out, and the ``fit`` record."""
    held = np.array([s["role"] == "held_out" for s in kit["subnets"]])
    space = kit["space"]
    return fit_and_check(x, y, held, len(space["stages"]), space["resolutions"], kit["seed"])


def _check_provider(runtime: str, provider: str) -> None:
    """Refuse an execution provider the runtime does not have here, naming those it has."""
    if runtime != "onnxruntime":
        raise ValueError(f"provider applies to the onnxruntime runtime only, not {runtime!r}")
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if provider not in available:
        raise ValueError(f"provider must be one of {available} (onnxruntime here), got {provider!r}")


def _runtime_version(runtime: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(runtime)
    except PackageNotFoundError:
        raise ValueError(f"runtime {runtime} is not installed here (pip install {runtime})") from None


def profile_kit(folder: str | Path, target: str, runtime: str = "onnxruntime", threads: int = 2,
                rounds: int = 6, samples: int = 2, sample_ms: float = 10.0, warmup_ms: float = 20.0,
                on_progress: Callable[[int, int], None] = lambda done, total: None,
                provider: str | None = None) -> dict[str, Any]:
    """Time the kit in ``folder`` on this device as ``target`` and return the latency table (the format the
    kit names): its entries, the fitted model, the references and the model's quality on held-out subnets.
    ``provider``: an onnxruntime execution provider (default the CPU's)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    check_sizes(threads, 1, rounds, samples, sample_ms, warmup_ms)
    if provider is not None:
        _check_provider(runtime, provider)
    runtime_version = _runtime_version(runtime)  # refused before any timing when it is not installed
    kit = read_kit(folder)
    # an int8 kit is quantized for one runtime's served file; one without `runtimes` (a server before API 1.5)
    # holds onnxruntime's
    runtimes = kit.get("runtimes") or (RUNTIMES[:1] if kit.get("precision", "fp32") != "fp32" else RUNTIMES)
    if runtime not in runtimes:
        raise KitError(f"{folder}: this kit's networks are {kit.get('weights_format', 'int8')}, run by "
                       f"{list(runtimes)} only, not {runtime}: fetch or write one for runtime {runtime}")
    t0 = time.perf_counter()
    items = [{"file": str(Path(folder, i["file"]).resolve()), "shape": [kit["batch"], *i["shape"]]}
             for i in kit["entries"] + kit["subnets"]]
    job = {"backend": runtime, "threads": threads, "rounds": rounds, "samples": samples, "sample_ms": sample_ms,
           "warmup_ms": warmup_ms, "seed": kit["seed"], "items": items, "provider": provider}
    total = len(items) * rounds
    with tempfile.TemporaryDirectory(prefix="ofa-profile-") as tmp:
        (result,) = run_workers([job], Path(tmp), f"profile {target}", "done", lambda done: on_progress(done, total))
    timings = Timings(np.array(result["times_ms"]), tuple(result["calls"]), time.perf_counter() - t0,
                      np.array(result["orders"]))
    ms = timings.ms
    n = len(kit["entries"])
    entries = {e["key"]: round(float(m), 6) for e, m in zip(kit["entries"], ms[:n])}
    e2e = ms[n:]
    model, fit = _fit(kit, _features(kit, entries), e2e)
    space = kit["space"]
    return {"format": kit["table"]["format"], "version": kit["table"]["version"], "target": target,
            "space": {"name": space["name"], "digest": kit["space_digest"]},
            "device": {"cpu": describe_cpu(), "threads": threads, "batch": kit["batch"], "backend": runtime,
                       "backend_version": runtime_version, "memory_format": "nchw",
                       "precision": kit.get("precision", "fp32"),
                       **({"weights_format": kit["weights_format"]} if "weights_format" in kit else {}),
                       **({"provider": provider} if provider else {})},
            "timing": {"rounds": rounds, "samples": samples, "sample_ms": sample_ms, "warmup_ms": warmup_ms,
                       "statistic": STATISTIC, "repeatability": timings.repeatability()},
            "entries": entries, "model": model,
            "references": [{"arch": s["arch"], "ms": round(float(m), 6)}
                           for s, m in zip(kit["subnets"], e2e) if s["role"] == "reference"],
            "fit": fit, "profile_seconds": round(time.perf_counter() - t0, 1)}
