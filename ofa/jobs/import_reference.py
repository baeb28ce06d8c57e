"""``ofa import-reference``: a reference OFAMobileNetV3 checkpoint (PyPI ``ofa``) as a servable artifact (the
weights, the space found from their shapes, ImageNet's data description, a calibration set drawn from a
folder of training images, and the reference's accuracy predictor when given), or as a supernet weights
file alone. The name mapping is :mod:`ofa.reference`'s."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .._io import sha256_file
from ..artifact import ACCURACY_PREDICTOR, add_file, write_artifact
from ..data import folder_calibration, imagenet_spec
from ..predict.reference_predictor import from_reference
from ..reference import (REFERENCE_EVAL_CROP, load_reference_state_dict, read_state_dict, reference_space)
from ..space import SearchSpace
from ..supernet import Supernet, supernet_bytes

__all__ = ["import_reference", "import_weights"]


def import_weights(checkpoint: str | Path, out: str | Path, space: SearchSpace | None = None) -> dict[str, Any]:
    """Write the supernet weights file ``out`` (safetensors, as in an artifact) of a reference checkpoint."""
    state = read_state_dict(checkpoint)
    space = space or reference_space(state)
    net = load_reference_state_dict(Supernet(space), state)
    Path(out).write_bytes(supernet_bytes(net))
    return {"out": str(out), "space": space.name, "tensors": len(net.state_dict())}


def import_reference(checkpoint: str | Path, out: str | Path, space: SearchSpace | None = None,
                     calib_dir: str | Path | None = None, calib_images: int = 2000, seed: int = 0,
                     accuracy_predictor: str | Path | None = None) -> dict[str, Any]:
    """Write the artifact ``out`` from a reference checkpoint (the space found from its shapes unless
    given); with ``calib_dir``, ``calib_images`` images drawn from it with ``seed`` are its calibration
    set (without, it can be profiled but not served); with ``accuracy_predictor`` (the reference's
    ``.pth``), that predictor is its accuracy predictor. Returns what was written."""

    if not 1 <= calib_images <= 100_000:
        raise ValueError(f"calib_images must be in 1..100000, got {calib_images}")
    t0 = time.perf_counter()
    state = read_state_dict(checkpoint)
    space = space or reference_space(state)
    net = load_reference_state_dict(Supernet(space), state)
    data = imagenet_spec(max(space.resolutions))
    calib, skipped = (None, 0) if calib_dir is None else folder_calibration(calib_dir, calib_images,
                                                                            data.image_size, seed)
    source = {"checkpoint": Path(checkpoint).name, "sha256": sha256_file(Path(checkpoint))}
    config = {"imported_from": "reference OFAMobileNetV3", **source, "dataset": data.name, "seed": seed,
              "image_size": data.image_size, "eval_crop": REFERENCE_EVAL_CROP,
              "calib_dir": str(calib_dir) if calib_dir else None, "calib_images": 0 if calib is None else len(calib)}
    write_artifact(Path(out), net, data, calib, config, {})
    summary = {"out": str(out), "space": space.name, "tensors": len(net.state_dict()), **source,
               "calibration_images": config["calib_images"], "unreadable_images": skipped}
    if accuracy_predictor is not None:
        pred_state = {k: v.float().numpy() for k, v in read_state_dict(accuracy_predictor, "accuracy_predictor").items()}
        pred = from_reference(pred_state, space, {"checkpoint": Path(accuracy_predictor).name,
                                                  "sha256": sha256_file(Path(accuracy_predictor))})
        add_file(Path(out), ACCURACY_PREDICTOR, pred.to_bytes())
        summary["accuracy_predictor"] = pred.family
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary
