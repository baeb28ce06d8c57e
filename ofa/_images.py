"""The values the dataset code passes around: a dataset's description, images in memory, the error;
and how an image file is read and cropped for training.

Their own module so that both :mod:`ofa.data` (the datasets) and :mod:`ofa.folder` (image folders,
decoded in workers) use them without importing each other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["UNREADABLE", "DataError", "DataSpec", "ImageSet", "read_rgb", "training_crop"]

UNREADABLE = (OSError, ValueError, SyntaxError)  # what PIL raises for a corrupt, truncated or non-image file


class DataError(ValueError):
    """A dataset that is missing or malformed; the message says where we looked."""


@dataclass(frozen=True)
class DataSpec:
    """What a model trained on this data expects: stored size, channels, classes, normalisation."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class ImageSet:
    """uint8 images (N, C, S, S) with int64 labels, in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])

    def batches(self, batch_size: int, order: torch.Tensor | None = None,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in ``order`` (default: as stored), beginning with batch number ``start``."""
        order = torch.arange(len(self)) if order is None else order
        for b in range(start, (len(order) + batch_size - 1) // batch_size):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield self.images[idx], self.labels[idx]


def read_rgb(path: str | Path) -> torch.Tensor:
    """An image file decoded as RGB, uint8 (3, H, W); raises one of :data:`UNREADABLE` when it cannot be."""
    from PIL import Image
    from torchvision.transforms import v2

    with Image.open(path) as im:
        return v2.functional.pil_to_tensor(im.convert("RGB"))


def training_crop(size: int, colour: bool) -> torch.nn.Module:
    """The reference's ImageNet training transform of a uint8 image: a random resized crop to ``size``
    (scale 0.08-1), a horizontal flip and, with ``colour``, brightness ±32/255 and saturation ±0.5."""
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    return v2.Compose(ops + ([v2.ColorJitter(brightness=32 / 255, saturation=0.5)] if colour else []))
