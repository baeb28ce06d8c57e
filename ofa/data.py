"""Datasets for training and evaluation: Fashion-MNIST (default), CIFAR-10, ImageFolder.

Images are kept as uint8 tensors (N, C, S, S) at the dataset's stored size ``S``; the
trainer resizes each batch to the resolution it draws and normalises it there, so
the same batches serve every resolution. Fashion-MNIST and CIFAR-10 live in memory; an
ImageFolder tree is decoded once at ``image_size`` (150 KB an image at 224 px) when that
takes at most :data:`STREAM_ABOVE_BYTES`, and streamed otherwise (:func:`training_data`,
:mod:`ofa.folder`: decoded per batch in ``DataLoader`` workers, memory bounded whatever
the folder's size); ``data_mode`` says which when the size should not.

Nothing here downloads while local files exist: Fashion-MNIST is read from Debian's
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or ``--data-dir``;
torchvision's download is the fallback only when no local copy is found.
"""
from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ._images import UNREADABLE, DataError, DataSpec, ImageSet, read_rgb, training_crop
from .folder import FolderIndex, decoded_bytes, open_folder

__all__ = [
    "DATASETS",
    "DataError",
    "DataSpec",
    "ImageSet",
    "augment",
    "calibration_choice",
    "folder_calibration",
    "imagefolder_spec",
    "imagenet_spec",
    "load_dataset",
    "prepare_batch",
    "SHIFT_SHARE",
    "split_test",
    "split_validation",
    "STREAM_ABOVE_BYTES",
    "training_data",
]

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


def _cache_root() -> Path:
    return Path(os.environ.get("OFA_CACHE", Path.home() / ".cache" / "ofa"))


def _read_idx(path: Path) -> torch.Tensor:
    """An idx file of unsigned bytes (Fashion-MNIST's format, gzipped or not): a big-endian header (two zero
    bytes, the type 0x08, the number of dimensions, then each dimension as 4 bytes), then the values."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"could not decompress {path}: {e}") from None
    ndim = data[3] if len(data) >= 4 else 0
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim]) if len(data) >= 4 + 4 * ndim else ()
    if data[:3] != b"\x00\x00\x08" or not dims or len(data) != 4 + 4 * ndim + math.prod(dims):
        raise DataError(f"{path} is not an idx file of unsigned bytes (its header says {data[:4].hex()}, "
                        f"{len(data)} bytes in all)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim).view(*dims)


def _fashion_files(data_dir: Path | None) -> list[Path] | None:
    """The four idx files (each gzipped or not) in ``data_dir`` (else Debian's folder) or in its torchvision
    layout (``FashionMNIST/raw/``); None if they are not all there."""
    src = data_dir if data_dir is not None else DEBIAN_FASHION_MNIST
    for folder in (src, src / "FashionMNIST" / "raw"):
        found = [next((p for p in (folder / f, folder / f"{f}.gz") if p.exists()), None) for f in _FMNIST_FILES]
        if all(found):
            return found
    return None


def _load_fashion(data_dir: Path | None, train: bool) -> ImageSet:
    """Fashion-MNIST read from its idx files by :func:`_read_idx`, not by torchvision's loader: that one wants
    its own folder layout (which meant unpacking Debian's files into a cache), and importing torchvision cost
    ~1.9 s here (its ``ops`` import ``torch._dynamo``: a process that builds an optimizer imports that anyway,
    ``ofa report`` does not). Its download is the fallback, only where no local copy is found."""
    files = _fashion_files(data_dir)
    if files is None:
        if data_dir is not None:
            raise DataError(
                f"Fashion-MNIST not found in {data_dir}: expected {', '.join(_FMNIST_FILES)} "
                f"(optionally .gz) there or under {data_dir}/FashionMNIST/raw/")
        root = _cache_root() / "datasets"
        log.warning("Fashion-MNIST not found in %s (install Debian's dataset-fashion-mnist); "
                    "falling back to torchvision's download into %s", DEBIAN_FASHION_MNIST, root)
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=train, download=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise DataError(f"could not download Fashion-MNIST into {root}: {e}") from None
        files = _fashion_files(root)
        assert files is not None, root  # torchvision's layout, just written
    images, labels = (_read_idx(f) for f in (files[0:2] if train else files[2:4]))
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST in {files[0].parent}: {tuple(images.shape)} images against "
                        f"{tuple(labels.shape)} labels")
    return ImageSet(images.unsqueeze(1).contiguous(), labels.long())


def _load_cifar10(data_dir: Path | None, train: bool) -> ImageSet:
    from torchvision.datasets import CIFAR10

    root = data_dir or (_cache_root() / "datasets")
    local = (Path(root) / "cifar-10-batches-py").exists()
    if not local and data_dir is not None:
        raise DataError(f"CIFAR-10 not found: expected {root}/cifar-10-batches-py/ "
                        "(torchvision's on-disk format)")
    try:
        ds = CIFAR10(str(root), train=train, download=not local)
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(f"could not read CIFAR-10 from {root}: {e}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.long))


def _load_folder(data_dir: Path | None, train: bool, image_size: int) -> tuple[ImageSet, tuple[str, ...]]:
    """An ImageFolder tree (``train/CLASS/*.jpg``, ``val/CLASS/*.jpg``), decoded once to uint8."""
    if data_dir is None:
        raise DataError("data_dir is needed by the imagefolder dataset (a folder with train/ and val/)")
    split = Path(data_dir) / ("train" if train else "val")
    if not split.is_dir():
        raise DataError(f"ImageFolder split not found: {split} (expected {data_dir}/train/CLASS/*.jpg "
                        f"and {data_dir}/val/CLASS/*.jpg)")
    index = open_folder(split)
    return index.load(image_size), index.classes


DATASETS = ("fashion-mnist", "cifar10", "imagefolder")


def load_dataset(name: str, data_dir: str | Path | None = None, train: bool = True,
                 image_size: int = 224) -> tuple[ImageSet, DataSpec]:
    """Load a dataset split as uint8 images plus the description a served model needs."""
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is not None and not data_dir.exists():
        raise DataError(f"data_dir {data_dir} does not exist")
    if name == "fashion-mnist":
        ds = _load_fashion(data_dir, train)
        spec = DataSpec(name, 1, 28, 10, (0.2860,), (0.3530,), FASHION_CLASSES)
    elif name == "cifar10":
        ds = _load_cifar10(data_dir, train)
        spec = DataSpec(name, 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES)
    elif name == "imagefolder":
        ds, classes = _load_folder(data_dir, train, image_size)
        spec = imagefolder_spec(image_size, classes)
    else:
        raise DataError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
    if len(ds) == 0:
        raise DataError(f"dataset {name!r} in {data_dir or 'the default location'} has no images")
    return ds, spec


def imagefolder_spec(image_size: int, classes: Sequence[str]) -> DataSpec:
    """An ImageFolder dataset's description: RGB at ``image_size``, ImageNet's mean/std, its classes."""
    return DataSpec("imagefolder", 3, image_size, len(classes), IMAGENET_MEAN, IMAGENET_STD, tuple(classes))


def imagenet_spec(image_size: int = 224) -> DataSpec:
    """ImageNet-1k as the reference's supernets were trained on it: mean/std and the 1000 class names in the
    classifier's order (torchvision's list, which ships with it: nothing is downloaded)."""
    from torchvision.models import MobileNet_V3_Large_Weights

    names = tuple(MobileNet_V3_Large_Weights.IMAGENET1K_V1.meta["categories"])
    return DataSpec("imagenet", 3, image_size, len(names), IMAGENET_MEAN, IMAGENET_STD, names)


def folder_calibration(folder: str | Path, count: int, size: int, seed: int) -> tuple[torch.Tensor, int]:
    """``count`` images drawn with ``seed`` from a tree of images (ImageFolder's ``CLASS/*.jpg``, or any
    folders), each decoded and cropped as the reference's ImageNet training transform does (a random
    resized crop to ``size``, scale 0.08-1, and a horizontal flip), as uint8 (n, 3, size, size); and how
    many files could not be read (each skipped, with the next draw in its place)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from ._torch import seeded

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"calib_dir {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"calib_dir {folder} holds no images (looked for {', '.join(IMG_EXTENSIONS)} files)")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    crop = training_crop(size, colour=False)
    images, bad = [], []
    with seeded(seed):
        for i in order:
            if len(images) == count:
                break
            try:
                images.append(crop(read_rgb(files[i])))
            except UNREADABLE as e:  # a corrupt or truncated file
                bad.append(f"{files[i]}: {e}")
    if bad:
        log.warning("calibration: %d of the files drawn could not be read and were skipped (first: %s)",
                    len(bad), bad[0][:300])
    if not images:
        raise DataError(f"calib_dir {folder}: none of its {len(files)} image files could be read")
    if len(images) < count:
        log.warning("calibration: %s holds %d readable images, fewer than the %d asked for", folder,
                    len(images), count)
    return torch.stack(images), len(bad)


def augment(images: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Per-image random crop (with zero padding) and horizontal flip of a uint8 batch (N, C, S, S), drawn from
    torch's global generator. Batched by hand: torchvision's v2 transforms draw one crop per call, and one call
    per image took 18 ms for 256 Fashion-MNIST images here against 0.9 ms for these gathers."""
    n, c, h, w = images.shape
    if padding:
        padded = F.pad(images, (padding,) * 4)
        top, left = (torch.randint(0, 2 * padding + 1, (n,)) for _ in range(2))
        rows = (top[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * padding)
        cols = (left[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
        images = padded.gather(2, rows).gather(3, cols)
    if flip:
        images = torch.where((torch.rand(n) < 0.5)[:, None, None, None], images.flip(-1), images)
    return images


def prepare_batch(images: torch.Tensor, resolution: int, spec: DataSpec,
                  device: torch.device | str = "cpu", channels_last: bool = True) -> torch.Tensor:
    """uint8 (N, C, S, S) → float, resized to ``resolution``, normalised, on ``device``."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=resolution < x.shape[-1])
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def split_validation(ds: ImageSet, size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """A fixed, seeded hold-out of ``size`` training images: (train, validation)."""
    if not 0 < size < len(ds):
        raise DataError(f"val_size must be in 1..{len(ds) - 1} (the training set has {len(ds)} images), got {size}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds), generator=g)
    return ds.subset(perm[size:].sort().values), ds.subset(perm[:size].sort().values)


SHIFT_SHARE = 0.5  # of a test split: measures the validation-to-test shift; the rest checks served subnets


def split_test(ds: ImageSet, seed: int) -> tuple[ImageSet, ImageSet]:
    """A test split cut in two, seeded: (shift half, evaluation half). ``ofa predictors`` measures the
    validation-to-test shift on the first (:mod:`ofa.predict.shift`); served subnets are checked on the
    second, which no predictor has seen."""
    if len(ds) < 2:
        raise DataError(f"a test split of {len(ds)} images cannot be cut in two")
    g = torch.Generator().manual_seed(seed + 2)
    perm = torch.randperm(len(ds), generator=g)
    n = max(1, min(len(ds) - 1, round(SHIFT_SHARE * len(ds))))
    return ds.subset(perm[:n].sort().values), ds.subset(perm[n:].sort().values)


def calibration_choice(n: int, count: int, seed: int) -> torch.Tensor:
    """Which ``count`` of ``n`` training images (sorted indices, chosen with a seed) are the calibration set."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(n, generator=g)[: min(count, n)].sort().values


def calibration_images(ds: ImageSet, count: int, seed: int) -> torch.Tensor:
    """``count`` training images (uint8) chosen with a seed, for BN re-calibration."""
    return ds.images[calibration_choice(len(ds), count, seed)].contiguous()


def class_balance(labels: Sequence[int], num_classes: int) -> list[int]:
    return torch.bincount(torch.as_tensor(labels), minlength=num_classes).tolist()


STREAM_ABOVE_BYTES = 4 << 30  # data_mode "auto": an ImageFolder larger than this decoded is streamed


def training_data(dataset: str, data_dir: str, data_mode: str, image_size: int,
                  workers: int) -> tuple[ImageSet | FolderIndex, DataSpec]:
    """A run's training data: in memory, or, for an ImageFolder with ``data_mode`` "stream" (or "auto" and
    more than :data:`STREAM_ABOVE_BYTES` decoded at ``image_size``), the index of ``data_dir/train`` to stream."""
    if dataset == "imagefolder" and data_mode != "memory":
        if not data_dir:
            raise DataError("data_dir is needed by the imagefolder dataset (a folder with train/ and val/)")
        index = open_folder(Path(data_dir) / "train", workers)
        size = decoded_bytes(index, image_size)
        if data_mode == "stream" or size > STREAM_ABOVE_BYTES:
            log.info("streaming %d images of %s (%.1f GiB decoded at %d px) through %d workers", len(index),
                     index.root, size / 2**30, image_size, workers)
            return index, imagefolder_spec(image_size, index.classes)
    return load_dataset(dataset, data_dir or None, True, image_size)
