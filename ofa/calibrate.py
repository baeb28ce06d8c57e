"""BatchNorm re-calibration of an extracted subnet: the one recipe for "the subnet we serve".

A subnet's BN statistics inside the supernet are those of whatever mix of subnets
trained it; before evaluation or serving they are re-estimated on a few thousand
training images at the subnet's own resolution. The estimate is the average of the
per-batch means and variances (a cumulative average, ``momentum=None``), so it does
not depend on an EMA rate and is the same for the same images in the same order.

:func:`served_subnet` is what the server streams and what ``ofa predictors`` measures (so
a prediction is about the subnet served), on the images :func:`served_images` picks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from .data import DataSpec, prepare_batch

if TYPE_CHECKING:
    from .artifact import Artifact
    from .space import Arch
    from .supernet import Supernet

__all__ = ["CalibrationCancelled", "calibrate_bn", "calibration_batches", "served_images", "served_subnet"]


class CalibrationCancelled(Exception):
    """``should_stop`` said so between two batches (the request that wanted the subnet went away)."""


# Images per calibration batch: 500 up to 141 px, fewer above, so that a batch holds at most as many pixels
# as the reference's 200 images at 224 px (its BN calibration batch; activations of 200 such images in the
# largest ImageNet subnet take ~1 GB a layer: 500 would take 2.5)
BATCH_IMAGES, BATCH_PIXELS = 500, 200 * 224 * 224


@torch.no_grad()
def calibrate_bn(model: nn.Module, images: torch.Tensor, spec: DataSpec, resolution: int,
                 batch_size: int | None = None, device: torch.device | str = "cpu",
                 should_stop: Callable[[], bool] | None = None) -> nn.Module:
    """Re-estimate every BN's running statistics of ``model`` on ``images`` (uint8, N×C×S×S).

    Only BN buffers change (parameters are untouched); the model is returned in eval
    mode. Operates in place, so pass a copy (``extract`` returns one). ``should_stop`` is
    asked before each batch; when it says so, :class:`CalibrationCancelled` is raised.
    ``batch_size`` defaults to :data:`BATCH_IMAGES`, fewer above 141 px (:data:`BATCH_PIXELS`).
    """
    if len(images) == 0:
        raise ValueError("calibration needs at least one image")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn.momentum, bn.training) for bn in bns]
    was_training = model.training
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average of the batch statistics
            bn.train()
        for batch in calibration_batches(images, spec, resolution, batch_size, device):
            if should_stop is not None and should_stop():
                raise CalibrationCancelled("the calibration was stopped")
            model(batch)
    finally:
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)
        model.train(was_training)
    return model.eval()


def calibration_batches(images: torch.Tensor, spec: DataSpec, resolution: int, batch_size: int | None = None,
                        device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """The float batches :func:`calibrate_bn` feeds, in order: nearly equal ones (sizes differ by at most
    one; the cumulative average weighs batches equally, so a small last batch must not count as much as a
    full one) of at most ``batch_size`` images (default :data:`BATCH_IMAGES`, fewer above 141 px)."""
    batch_size = batch_size or min(BATCH_IMAGES, BATCH_PIXELS // (resolution * resolution))
    for chunk in torch.tensor_split(images, -(-len(images) // batch_size)):
        yield prepare_batch(chunk, resolution, spec, device)


def served_subnet(supernet: Supernet, arch: Arch, images: torch.Tensor, spec: DataSpec,
                  device: torch.device | str = "cpu", should_stop: Callable[[], bool] | None = None) -> nn.Module:
    """``arch`` as served: extracted from ``supernet``, BN re-calibrated on ``images`` in their order, eval mode."""
    from .supernet import extract

    return calibrate_bn(extract(supernet, arch).to(device), images, spec, arch.resolution, device=device,
                        should_stop=should_stop)


def served_images(art: Artifact) -> torch.Tensor:
    """The calibration images of served subnets: as many of the stored ones as the manifest says
    (:data:`ofa.artifact.SERVED_CALIBRATION`: the accuracy predictor's measurements used that many, so what
    is predicted is what is served), else all stored."""
    from .artifact import ACCURACY_PREDICTOR, SERVED_CALIBRATION

    count = art.manifest.get(SERVED_CALIBRATION)
    if count is None and art.files.has(ACCURACY_PREDICTOR):  # a predictor stored before the manifest said so
        from .predict.accuracy import AccuracyPredictor

        count = AccuracyPredictor.from_bytes(art.files.read(ACCURACY_PREDICTOR)).info.get("calib_images")
    return art.calibration if count is None else art.calibration[:count]
