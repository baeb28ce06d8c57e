"""Accuracy of a subnet taken out of the supernet: extract → BN re-calibration → top-1."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .calibrate import served_subnet
from .data import DataSpec, ImageSet, prepare_batch
from .space import Arch
from .supernet import Supernet

__all__ = ["EVAL_BATCH", "accuracy", "correct_per_image", "percent_correct", "subnet_accuracy", "subnet_correct"]


EVAL_BATCH = 200  # images per forward: at 24-32 px on 2 cores faster than 1000 (2.2 s vs 2.9 s for 2,000)


@torch.no_grad()
def correct_per_image(model: nn.Module, data: ImageSet, spec: DataSpec, resolution: int,
                      batch_size: int = EVAL_BATCH, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which images of ``data`` (in order) ``model`` classifies correctly at ``resolution`` (bool)."""
    model.eval()
    hits = [model(prepare_batch(images, resolution, spec, device)).argmax(1).cpu() == labels
            for images, labels in data.batches(batch_size)]
    return torch.cat(hits)


def percent_correct(hits: torch.Tensor | np.ndarray) -> float:
    """Top-1 accuracy (%) from per-image correctness, exactly (integer count over images)."""
    return 100.0 * int(hits.sum()) / len(hits)


def accuracy(model: nn.Module, data: ImageSet, spec: DataSpec, resolution: int,
             batch_size: int = EVAL_BATCH, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of ``model`` on ``data`` at ``resolution``."""
    return percent_correct(correct_per_image(model, data, spec, resolution, batch_size, device))


def subnet_correct(supernet: Supernet, arch: Arch, calib: torch.Tensor, data: ImageSet,
                   spec: DataSpec, batch_size: int = EVAL_BATCH, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-image correctness of ``arch`` as served (:func:`ofa.calibrate.served_subnet` on ``calib``)."""
    sub = served_subnet(supernet, arch, calib, spec, device).to(memory_format=torch.channels_last)  # faster here
    return correct_per_image(sub, data, spec, arch.resolution, batch_size, device)


def subnet_accuracy(supernet: Supernet, arch: Arch, calib: torch.Tensor, data: ImageSet,
                    spec: DataSpec, batch_size: int = EVAL_BATCH, device: torch.device | str = "cpu") -> float:
    """Accuracy (%) of ``arch`` as served: extracted, BN re-calibrated on ``calib``, no re-training."""
    return percent_correct(subnet_correct(supernet, arch, calib, data, spec, batch_size, device))
