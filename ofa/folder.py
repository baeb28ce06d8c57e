"""Image folders: an index of files, decoded per sample in ``DataLoader`` workers.

:class:`FolderIndex` holds the files and labels of an ImageFolder split (``CLASS/*.jpg``), not their
pixels, so memory stays bounded whatever the folder's size. It splits like an in-memory
:class:`~ofa.data.ImageSet` (``subset``), decodes a whole split or the small sets a run keeps
(validation, calibration) with :meth:`FolderIndex.load`, and streams training batches with
:meth:`FolderIndex.stream`: each step's images, in the order and at the resolution the step asks
for, cropped and coloured as the reference's ImageNet recipe does (a random resized crop, scale
0.08-1, a horizontal flip, brightness ±32/255 and saturation ±0.5). Every image's augmentation is
seeded by what the trainer gives for it (derived from seed, phase, step, rank and position), so
the batches are the same whatever the number of workers, and a resumed run gets the batches a
fresh run would. A file that cannot be read is skipped (the batch is one image shorter) and
counted; it never stops an epoch.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ._images import UNREADABLE, DataError, ImageSet, read_rgb, training_crop

__all__ = ["FolderIndex", "StepBatch", "decoded_bytes", "open_folder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepBatch:
    """What one training step asks for: its number, the images' indices, their resolution, their seeds."""

    step: int
    index: Sequence[int]
    resolution: int
    seeds: Sequence[int]


class _Decode(torch.utils.data.Dataset):
    """Decodes one file: ``("train", path, resolution, seed)`` augmented, ``("eval", path, size, crop)``
    resized to ``size / crop`` and centre-cropped to ``size``; an unreadable file gives None."""

    def __len__(self) -> int:  # items are addressed by the sampler's tuples, not by position
        return 0

    def __getitem__(self, item: tuple) -> torch.Tensor | None:
        from torchvision.transforms import v2

        from ._torch import seeded

        try:
            img = read_rgb(item[1])
        except UNREADABLE:
            return None
        if item[0] == "eval":
            size, crop = item[2], item[3]
            img = v2.functional.resize(img, [int(math.ceil(size / crop))], antialias=True)
            return v2.functional.center_crop(img, [size, size])
        with seeded(item[3]):
            return training_crop(item[2], colour=True)(img)


def _collate(items: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The readable images stacked, and which of the batch they are."""
    ok = torch.tensor([x is not None for x in items])
    kept = [x for x in items if x is not None]
    return (torch.stack(kept) if kept else None), ok


@dataclass
class FolderIndex:
    """The files and labels of an image folder split; pixels are read when asked for."""

    root: Path
    files: list[str]
    labels: torch.Tensor
    classes: tuple[str, ...]
    workers: int = 2

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: torch.Tensor) -> "FolderIndex":
        return FolderIndex(self.root, [self.files[int(i)] for i in index], self.labels[index], self.classes,
                           self.workers)

    def _loader(self, batches: Iterable[list[tuple]]) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
        workers = min(self.workers, os.cpu_count() or 1)
        # a generator of its own: the loader's workers' base seed (unused: every image is seeded) is not drawn
        # from torch's global one, which the trainer's step seeds for its dropout
        return iter(torch.utils.data.DataLoader(_Decode(), batch_sampler=batches, num_workers=workers,
                                                collate_fn=_collate, prefetch_factor=4 if workers else None,
                                                persistent_workers=False, generator=torch.Generator()))

    def load(self, size: int, crop: float = 1.0, batch: int = 256) -> ImageSet:
        """Every file decoded, resized to ``size / crop`` and centre-cropped to ``size`` (uint8, in memory).
        An unreadable file is left out (with its label) and counted in the log."""
        chunks = [[("eval", f, size, crop) for f in self.files[i : i + batch]] for i in range(0, len(self.files), batch)]
        images, keep = [], []
        for x, ok in self._loader(chunks):
            if x is not None:
                images.append(x)
            keep.append(ok)
        keep_all = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool)
        if not keep_all.all():
            log.warning("%s: %d of %d images could not be read and were left out", self.root,
                        int((~keep_all).sum()), len(keep_all))
        if not images:
            raise DataError(f"{self.root}: none of its {len(self.files)} image files could be read")
        return ImageSet(torch.cat(images), self.labels[keep_all])

    def stream(self, plan: Iterable[StepBatch]) -> Iterator[tuple[StepBatch, torch.Tensor, torch.Tensor]]:
        """(step, uint8 images at its resolution, which of its indices they are) for each step of ``plan``,
        decoded ahead in the workers."""
        plan = iter(plan)
        asked: list[StepBatch] = []

        def batches() -> Iterator[list[tuple]]:
            for sb in plan:
                asked.append(sb)
                yield [("train", self.files[i], sb.resolution, s) for i, s in zip(sb.index, sb.seeds)]

        for x, ok in self._loader(batches()):
            sb = asked.pop(0)
            if x is None:
                x = torch.zeros((0, 3, sb.resolution, sb.resolution), dtype=torch.uint8)
            yield sb, x, ok


def open_folder(split: Path, workers: int = 2) -> FolderIndex:
    """The index of an ImageFolder split (``CLASS/*`` image files, classes in sorted order)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    if not split.is_dir():
        raise DataError(f"ImageFolder split not found: {split} (expected CLASS/*.jpg folders in it)")
    try:
        classes, to_index = find_classes(str(split))
    except FileNotFoundError as e:
        raise DataError(f"could not read ImageFolder {split}: {e}") from None
    files, labels = [], []
    for c in classes:
        for p in sorted((split / c).rglob("*")):
            if p.suffix.lower() in IMG_EXTENSIONS and p.is_file():
                files.append(str(p))
                labels.append(to_index[c])
    if not files:
        raise DataError(f"ImageFolder {split} holds no images")
    return FolderIndex(split, files, torch.tensor(labels, dtype=torch.long), tuple(classes), workers)


def decoded_bytes(index: FolderIndex, size: int) -> int:
    """What the folder would take in memory decoded at ``size`` (uint8 RGB)."""
    return len(index) * 3 * size * size

