"""The elastic MobileNetV3 supernet: ``supernet(x, arch)`` and ``extract(supernet, arch)``.

The subnet is an argument of every call, never state on the modules. Weights of a
subnet are prefixes of the supernet's (channels) and transformed centres of its
kernels (kernel size); depth keeps the first blocks of each stage.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import DynamicBatchNorm, DynamicDepthwise, DynamicPointwise, DynamicSE
from .space import Arch, SearchSpace, StageSpec
from .subnet import Head, InvertedResidual, SubNet, load_subnet, make_activation, make_stem

__all__ = ["DynamicBlock", "Supernet", "extract", "supernet_bytes"]


class DynamicBlock(nn.Module):
    """An inverted-residual block with elastic kernel size and expand ratio."""

    def __init__(self, space: SearchSpace, in_ch: int, stage: StageSpec, stride: int) -> None:
        super().__init__()
        self.space = space
        self.in_ch, self.out_ch, self.stride = in_ch, stage.width, stride
        max_mid = space.mid_channels(in_ch, max(space.expand_choices))
        bn = dict(eps=space.bn_eps, momentum=space.bn_momentum)
        self.expand = DynamicPointwise(in_ch, max_mid)
        self.expand_bn = DynamicBatchNorm(max_mid, **bn)
        self.depthwise = DynamicDepthwise(max_mid, space.kernel_choices, stride)
        self.depthwise_bn = DynamicBatchNorm(max_mid, **bn)
        self.se = DynamicSE(max_mid, space.se_reduction, space.divisor) if stage.se else None
        self.project = DynamicPointwise(max_mid, stage.width)
        self.project_bn = nn.BatchNorm2d(stage.width, **bn)
        self.act = make_activation(stage.act)
        self.residual = stride == 1 and in_ch == stage.width

    def forward(self, x: torch.Tensor, kernel: int, expand: int) -> torch.Tensor:
        mid = self.space.mid_channels(self.in_ch, expand)
        y = self.act(self.expand_bn(self.expand(x, mid)))
        y = self.act(self.depthwise_bn(self.depthwise(y, kernel)))
        if self.se is not None:
            y = self.se(y)
        y = self.project_bn(self.project(y, self.out_ch))
        return x + y if self.residual else y

    def active_state(self, kernel: int, expand: int) -> dict[str, torch.Tensor]:
        """The state dict of the static :class:`InvertedResidual` for this choice."""
        mid = self.space.mid_channels(self.in_ch, expand)
        state = {
            "expand.conv.weight": self.expand.active_weight(self.in_ch, mid),
            "depthwise.conv.weight": self.depthwise.active_weight(mid, kernel),
            "project.conv.weight": self.project.active_weight(mid, self.out_ch),
        }
        for prefix, bn in (("expand.bn.", self.expand_bn), ("depthwise.bn.", self.depthwise_bn)):
            state.update({prefix + k: v for k, v in bn.active_state(mid).items()})
        state.update({"project.bn." + k: v for k, v in self.project_bn.state_dict().items()})
        if self.se is not None:
            state.update({"se." + k: v for k, v in self.se.active_state(mid).items()})
        return state

    @torch.no_grad()
    def reorder_channels(self) -> torch.Tensor:
        """Sort the middle channels by importance (L1 norm of the projection weights).

        The block computes the same function afterwards; the most important channels
        come first, so the prefixes that smaller expand ratios keep are the best ones.
        Returns the permutation applied.
        """
        importance = self.project.weight.abs().sum(dim=(0, 2, 3))
        order = torch.argsort(importance, descending=True, stable=True)
        self.expand.weight.copy_(self.expand.weight[order])
        for bn in (self.expand_bn, self.depthwise_bn):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.copy_(t[order])
        self.depthwise.weight.copy_(self.depthwise.weight[order])
        self.project.weight.copy_(self.project.weight[:, order])
        if self.se is not None:
            self.se.reduce.weight.copy_(self.se.reduce.weight[:, order])
            self.se.expand.weight.copy_(self.se.expand.weight[order])
            self.se.expand.bias.copy_(self.se.expand.bias[order])
        return order


class Supernet(nn.Module):
    """The supernet of a :class:`SearchSpace`; ``forward(x, arch)`` runs one subnet."""

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        self.stem = make_stem(space)
        self.first_block = InvertedResidual(space.first_block(), space.bn_momentum, space.bn_eps)
        self.blocks = nn.ModuleList(DynamicBlock(space, slot.in_ch, slot.spec, slot.stride) for slot in space.slots())
        self.head = Head(space)

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        x = self.first_block(self.stem(x))
        for slot, k, e in self.space.active_slots(arch):
            x = self.blocks[slot.index](x, k, e)
        return self.head(x)

    def subnet_state_dict(self, arch: Arch) -> dict[str, torch.Tensor]:
        """The state dict of ``SubNet(space, arch)``, as views of the supernet's tensors."""
        state = {f"stem.{k}": v for k, v in self.stem.state_dict().items()}
        state.update({f"blocks.0.{k}": v for k, v in self.first_block.state_dict().items()})
        for i, (slot, k, e) in enumerate(self.space.active_slots(arch), start=1):
            state.update({f"blocks.{i}.{n}": v for n, v in self.blocks[slot.index].active_state(k, e).items()})
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return state

    def reorder_channels(self) -> None:
        """Sort every elastic block's middle channels by importance (before an expand phase)."""
        for block in self.blocks:
            block.reorder_channels()


@torch.no_grad()
def extract(supernet: Supernet, arch: Arch) -> SubNet:
    """A static :class:`SubNet` holding copies of ``supernet``'s weights for ``arch`` (eval mode)."""
    state = {k: v.detach().clone(memory_format=torch.contiguous_format)
             for k, v in supernet.subnet_state_dict(arch).items()}
    return load_subnet(supernet.space, arch, state)


def supernet_bytes(supernet: Supernet) -> bytes:
    """The supernet's weights as an artifact stores them: safetensors, the space's name in its metadata."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in supernet.state_dict().items()}
    return save(state, metadata={"space": supernet.space.name})
