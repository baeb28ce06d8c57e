"""Training a fixed network from scratch: the baselines OFA is measured against.

Two comparisons use it: a subnet's arch trained alone vs the same arch taken out of
the supernet (``benchmarks/from_scratch.py``), and torchvision's hand-designed
``mobilenet_v3_small`` vs the served subnets at equal latency (``ofa report
--baselines``). Both train on the supernet's training split (its validation split
held out) with its batch size, optimiser, augmentation and label smoothing, for the
same total number of epochs as all of its phases together, with a cosine schedule.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .._torch import seeded
from ..data import DataSpec, ImageSet, augment, prepare_batch
from ..train.schedule import set_lr, sgd, warmup_cosine

__all__ = ["train_from_scratch"]


def train_from_scratch(net: nn.Module, resolution: int, train_set: ImageSet, spec: DataSpec,
                       training: Mapping[str, Any], epochs: float, seed: int = 0, progress: bool = True,
                       desc: str = "from scratch") -> tuple[nn.Module, dict[str, float]]:
    """Train ``net`` in place on ``train_set`` at ``resolution`` with the recipe in ``training``.

    ``training`` is an artifact's recorded training config (batch size, weight decay,
    momentum, augmentation, label smoothing, and the first phase's lr and warm-up).
    Returns the net in eval mode and {steps, seconds, img_per_s}.
    """
    net = net.to(memory_format=torch.channels_last).train()
    first = training["phases"][0]
    opt = sgd(net, first["lr"], training["weight_decay"], training["momentum"], training["nesterov"])
    bs = training["batch_size"]
    per_epoch = len(train_set) // bs
    if per_epoch < 1:
        raise ValueError(f"the training split has {len(train_set)} images, fewer than one batch of {bs}")
    total = max(1, round(epochs * per_epoch))
    warmup = min(total - 1, round(first.get("warmup_epochs", 0.0) * per_epoch))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_set), generator=g)
    t0 = time.perf_counter()
    with seeded(seed):  # augmentation and dropout draw from torch's generator
        for step in tqdm(range(total), desc=desc, unit="step", disable=not progress, dynamic_ncols=True):
            b = step % per_epoch
            if b == 0 and step:
                order = torch.randperm(len(train_set), generator=g)
            idx = order[b * bs : (b + 1) * bs]
            x = prepare_batch(augment(train_set.images[idx], training["augment_padding"], training["augment_flip"]),
                              resolution, spec)
            set_lr(opt, warmup_cosine(first["lr"], step, total, warmup, divide_first=False))
            loss = F.cross_entropy(net(x), train_set.labels[idx], label_smoothing=training["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    return net.eval(), {"steps": total, "seconds": round(seconds, 1), "img_per_s": round(total * bs / seconds, 1)}
