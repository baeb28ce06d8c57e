"""``ofa int8-accuracy``: what int8 costs the served subnets, measured, so that an int8 target's predictions say it.

For ``subnets`` of the subnets ``ofa predictors`` measured (spread over their measured accuracy), the
served int8 file of one runtime (:mod:`ofa.export`: ``onnx_int8``, onnxruntime's static quantizer, or
``openvino_int8``, NNCF's; both calibrated on the artifact's served calibration images) is evaluated,
in that runtime, on the same validation images as the fp32 measurement. The drop is paired: the same
images, the same subnet, so the split's sampling noise mostly cancels. The model is a constant drop
with its spread across subnets, per format. With tens of subnets, a per-arch model would fit noise, and
the measured drops here were small and did not follow MACs (their correlation is recorded). The server
adds the mean drop of the target's format to an int8 target's predictions and widens the interval by the
spread (:func:`int8_drop`, :func:`at_int8`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..artifact import INT8_ACCURACY, MEASUREMENTS, ArtifactFiles, add_file, load_artifact

__all__ = ["at_int8", "int8_drop", "measure_int8"]


def measure_int8(root: str | Path, subnets: int = 24, data_dir: str | None = None,
                 log: Callable[[str], None] = lambda s: None, runtime: str = "onnxruntime") -> dict[str, Any]:
    """Measure the int8 accuracy of ``subnets`` measured subnets of the artifact at ``root`` as ``runtime``'s
    served int8 file, run there, store the drop under that format (:data:`ofa.artifact.INT8_ACCURACY`) and
    return it."""
    from importlib.metadata import version

    from ..evaluate import accuracy
    from ..export import FORMATS, run_format, subnet_file
    from ..predict.measure import validation_set
    from ..predict.timing import Timing
    from ..space import Arch

    if subnets < 2:
        raise ValueError(f"subnets must be >= 2 (a spread needs two), got {subnets}")
    Timing(backend=runtime, precision="int8").check()  # ValueErrors name the pairs, or the package missing
    form = FORMATS[run_format(runtime, "int8")]
    art = load_artifact(root)
    if not art.files.has(MEASUREMENTS):
        raise ValueError(f"{root} has no measured subnets: run `ofa predictors` on it first")
    data = art.files.read_json(MEASUREMENTS)
    if data.get("artifact") != art.digest:
        raise ValueError(f"{root}: the measured subnets are of other weights; run `ofa predictors` again")
    measured = data["subnets"]
    ids = sorted(measured, key=lambda i: (measured[i]["accuracy"], i))
    chosen = [ids[int(k)] for k in np.unique(np.linspace(0, len(ids) - 1, min(subnets, len(ids))).round())]
    val, spec = validation_set(art.manifest["training"], data_dir)
    t0, rows = time.perf_counter(), []
    for i in chosen:
        arch = Arch.from_dict(measured[i]["arch"])
        served = subnet_file(art, arch, form.name).data  # the file an int8 target of the runtime gets
        int8 = accuracy(form.read(served), val, spec, arch.resolution)
        rows.append({"id": i, "fp32": measured[i]["accuracy"], "int8": round(int8, 4),
                     "drop": round(int8 - measured[i]["accuracy"], 4), "macs": measured[i].get("macs")})
        log(f"  {i}: fp32 {rows[-1]['fp32']:.2f}%, int8 {int8:.2f}% ({rows[-1]['drop']:+.2f})")
    drops = np.array([r["drop"] for r in rows])
    macs = [r["macs"] for r in rows]
    corr = float(np.corrcoef(macs, drops)[0, 1]) if None not in macs and drops.std() > 0 else None
    quantizer = f"{form.needs or runtime} {version(form.needs or runtime)}, run in {runtime} {version(runtime)}"
    result = {"precision": "int8", "format": form.name, "quantizer": quantizer, "model": "constant",
              "artifact": art.digest, "subnets": len(rows), "val_images": len(val),
              "mean_drop": round(float(drops.mean()), 4), "sd": round(float(drops.std(ddof=1)), 4),
              "macs_correlation": None if corr is None else round(corr, 3),
              "seconds": round(time.perf_counter() - t0, 1), "measured": rows}
    stored = {fmt: r for fmt, r in _stored(art.files).items() if r.get("artifact") == art.digest}
    add_file(Path(root), INT8_ACCURACY, json.dumps({**stored, form.name: result}, indent=1, sort_keys=True))
    return result


def _stored(files: ArtifactFiles) -> dict[str, Any]:
    """{format: result} of the artifact's int8 file (one written before formats were keyed is onnx_int8's)."""
    if not files.has(INT8_ACCURACY):
        return {}
    data = files.read_json(INT8_ACCURACY)
    if not isinstance(data, dict):
        return {}
    if "mean_drop" in data:  # the one int8 format there was
        from ..export import run_format

        return {run_format("onnxruntime", "int8"): data}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def int8_drop(files: ArtifactFiles) -> dict[str, dict[str, Any]]:
    """{int8 format: its stored accuracy drop (``mean_drop``, ``sd``, ``subnets``)} of these very weights."""
    return {fmt: {k: r[k] for k in ("mean_drop", "sd", "subnets")}
            for fmt, r in _stored(files).items() if r.get("artifact") == files.digest}


def at_int8(candidate: Any, drop: dict[str, Any], level: float) -> Any:
    """A search result's accuracy as its int8 file will score: the mean drop added, and each side of the
    interval widened (in quadrature) by the drops' spread at the interval's ``level``."""
    from dataclasses import replace
    from statistics import NormalDist

    acc = candidate.accuracy + drop["mean_drop"]
    if candidate.accuracy_low is None or candidate.accuracy_high is None or not level:
        return replace(candidate, accuracy=acc)
    spread = NormalDist().inv_cdf((1 + level) / 2) * drop["sd"]
    below = float(np.hypot(candidate.accuracy - candidate.accuracy_low, spread))
    above = float(np.hypot(candidate.accuracy_high - candidate.accuracy, spread))
    return replace(candidate, accuracy=acc, accuracy_low=acc - below, accuracy_high=acc + above)
