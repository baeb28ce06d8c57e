"""The learning-rate schedule and the optimizer: one recipe for the supernet and the baselines.

Both train with SGD (weight decay on the weights only) and a linear warm-up then cosine
decay to zero, computed as a pure function of the step, so a resumed run sets the same
rates. ``ofa.scratch`` uses these for the networks OFA is compared against.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import Phase

__all__ = ["lr_at", "no_decay", "set_lr", "sgd", "warmup_cosine"]


def warmup_cosine(base_lr: float, step: int, total: int, warmup: int, *, divide_first: bool = True) -> float:
    """The rate of ``step`` of ``total``: linear warm-up over ``warmup`` steps, then cosine decay to zero.

    ``divide_first=False`` computes the cosine's angle as ``pi * k / n`` instead of
    ``pi * (k / n)``: the two round differently (in about one step of five, by an ulp),
    and the baselines were trained with the first, the supernet with the second; each
    keeps its own so that a seed still gives the same weights.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    angle = math.pi * ((step - warmup) / span) if divide_first else math.pi * (step - warmup) / span
    return 0.5 * base_lr * (1 + math.cos(angle))


def lr_at(phase: Phase, step: int, total: int, steps_per_epoch: int) -> float:
    """The supernet's rate at ``step`` of a phase of ``total`` steps (its warm-up rounded down to whole steps)."""
    return warmup_cosine(phase.lr, step, total, int(phase.warmup_epochs * steps_per_epoch))


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Whether a parameter is exempt from weight decay: BN scales and biases (1-D), and kernel transforms,
    which start as identities and must not shrink towards zero."""
    return param.dim() <= 1 or "transform_" in name


def sgd(net: nn.Module, lr: float, weight_decay: float, momentum: float, nesterov: bool) -> torch.optim.SGD:
    """SGD over ``net``'s parameters in two groups: the weights, decayed, and the :func:`no_decay` ones."""
    decay, exempt = [], []
    for name, p in net.named_parameters():
        (exempt if no_decay(name, p) else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": exempt, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=nesterov)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's rate (the schedule is applied before each step)."""
    for group in opt.param_groups:
        group["lr"] = lr
