"""The loss of one training step: every subnet of the step, with the labels and the teacher's logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..space import Arch
from ..supernet import Supernet

__all__ = ["Objective", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution (the teacher's softmax), averaged over the batch."""
    return torch.sum(-soft_targets * F.log_softmax(logits, dim=1), dim=1).mean()


class Objective(nn.Module):
    """The loss of one step, over all its subnets, in one forward (so DDP sees one graph).

    The subnets' losses are summed, so their gradients accumulate as in the reference
    (one backward per subnet): a phase's lr is each subnet's step size, whatever the
    number of subnets per step. With ``teacher_logits`` each subnet distils from the
    teacher; with ``sandwich`` the first arch (the largest) learns from the labels and
    the others distil from it.
    """

    def __init__(self, supernet: Supernet, label_smoothing: float) -> None:
        super().__init__()
        self.supernet = supernet
        self.label_smoothing = label_smoothing

    def forward(self, x: torch.Tensor, labels: torch.Tensor, archs: list[Arch], kd_ratio: float,
                teacher_logits: torch.Tensor | None, sandwich: bool) -> torch.Tensor:
        total = x.new_zeros(())
        for i, arch in enumerate(archs):
            logits = self.supernet(x, arch)
            if sandwich and i == 0:
                teacher_logits = logits.detach()
                kd = None
            else:
                kd = teacher_logits
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            if kd is not None and kd_ratio > 0:
                loss = loss + kd_ratio * soft_cross_entropy(logits, F.softmax(kd.float(), dim=1))
            total = total + loss
        return total
