"""Accuracy of a subnet taken out of the supernet: extract → BN re-calibration → top-1."""
from __future__ import annotations

import torch
from torch import nn

from .calibrate import calibrate_bn
from .data import DataSpec, ImageSet, prepare_batch
from .space import Arch
from .supernet import Supernet, extract

__all__ = ["accuracy", "subnet_accuracy"]


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageSet, spec: DataSpec, resolution: int,
             batch_size: int = 1000, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of ``model`` on ``data`` at ``resolution``."""
    model.eval()
    correct = 0
    for images, labels in data.batches(batch_size):
        logits = model(prepare_batch(images, resolution, spec, device))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
    return 100.0 * correct / len(data)


def subnet_accuracy(supernet: Supernet, arch: Arch, calib: torch.Tensor, data: ImageSet,
                    spec: DataSpec, batch_size: int = 1000, device: torch.device | str = "cpu") -> float:
    """Accuracy of ``arch`` as served: extracted, BN re-calibrated on ``calib``, no re-training."""
    sub = extract(supernet, arch).to(device).to(memory_format=torch.channels_last)
    calibrate_bn(sub, calib, spec, arch.resolution, device=device)
    return accuracy(sub, data, spec, arch.resolution, batch_size, device)
