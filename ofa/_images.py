"""The values the dataset code passes around: a dataset's description, images in memory, the error.

Their own module so that both :mod:`ofa.data` (the datasets) and :mod:`ofa.folder` (image folders,
decoded in workers) use them without importing each other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch

__all__ = ["DataError", "DataSpec", "ImageSet"]


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
