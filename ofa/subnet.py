"""The static, ready-to-run network of one Arch, made of standard torch modules.

This file depends on torch and :mod:`ofa.space` (numpy) only: the client rebuilds a
served subnet from its arch, its search-space JSON and a safetensors file with it,
without the training stack. The supernet reuses the fixed parts (stem, first block,
head) from here so that both share one definition and one state-dict layout.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from .space import Arch, BlockSpec, SearchSpace

__all__ = [
    "ConvBNAct",
    "InvertedResidual",
    "SqueezeExcite",
    "SubNet",
    "build_part",
    "build_subnet",
    "load_subnet",
    "make_activation",
    "mobilenet_v3_small_baseline",
    "module_of",
]

_ACTIVATIONS = {"relu": nn.ReLU, "h_swish": nn.Hardswish}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (``relu`` or ``h_swish``)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}") from None


class ConvBNAct(nn.Sequential):
    """Conv (same padding, no bias) → BatchNorm → optional activation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, act: str | None = None, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5, device: torch.device | str | None = None) -> None:
        layers = OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False,
                           device=device),
            bn=nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum, device=device),
        )
        if act is not None:
            layers["act"] = make_activation(act)
        super().__init__(layers)


class SqueezeExcite(nn.Module):
    """x · hard_sigmoid(W2 relu(W1 mean(x))) — the MobileNetV3 SE."""

    def __init__(self, channels: int, squeeze: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1, device=device)
        self.expand = nn.Conv2d(squeeze, channels, 1, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.expand(torch.relu(self.reduce(s)))
        return x * nn.functional.hardsigmoid(s)


class InvertedResidual(nn.Module):
    """1×1 expand → k×k depthwise → SE → 1×1 project, plus identity when shapes allow."""

    def __init__(self, spec: BlockSpec, bn_momentum: float = 0.1, bn_eps: float = 1e-5,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        bn = dict(bn_momentum=bn_momentum, bn_eps=bn_eps, device=device)
        self.residual = spec.residual
        self.expand = (ConvBNAct(spec.in_ch, spec.mid_ch, 1, act=spec.act, **bn)
                       if spec.expand_conv else None)
        self.depthwise = ConvBNAct(spec.mid_ch, spec.mid_ch, spec.kernel, spec.stride,
                                   groups=spec.mid_ch, act=spec.act, **bn)
        self.se = SqueezeExcite(spec.mid_ch, spec.se_ch, device) if spec.se else None
        self.project = ConvBNAct(spec.mid_ch, spec.out_ch, 1, **bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.depthwise(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class Head(nn.Module):
    """Final 1×1 expand, global average pool, 1×1 feature mix (no BN), dropout, linear."""

    def __init__(self, space: SearchSpace, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.final_expand = ConvBNAct(space.stages[-1].width, space.final_expand_width, 1,
                                      act="h_swish", bn_momentum=space.bn_momentum,
                                      bn_eps=space.bn_eps, device=device)
        self.feature_mix = nn.Conv2d(space.final_expand_width, space.head_width, 1, bias=False,
                                     device=device)
        self.act = nn.Hardswish()
        self.dropout = nn.Dropout(space.dropout)
        self.classifier = nn.Linear(space.head_width, space.num_classes, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_expand(x).mean((2, 3), keepdim=True)
        x = self.act(self.feature_mix(x)).flatten(1)
        return self.classifier(self.dropout(x))


def make_stem(space: SearchSpace, device: torch.device | str | None = None) -> ConvBNAct:
    return ConvBNAct(space.in_channels, space.stem_width, 3, space.stem_stride, act="h_swish",
                     bn_momentum=space.bn_momentum, bn_eps=space.bn_eps, device=device)


class SubNet(nn.Module):
    """One static subnet: ``stem → blocks → head``. Input is (N, C, r, r) at any r."""

    def __init__(self, space: SearchSpace, arch: Arch, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.space = space
        self.arch = space.validate(arch)
        bn = dict(bn_momentum=space.bn_momentum, bn_eps=space.bn_eps, device=device)
        self.stem = make_stem(space, device)
        self.blocks = nn.Sequential(*(InvertedResidual(b, **bn) for b in space.blocks(arch)))
        self.head = Head(space, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build_subnet(space: SearchSpace, arch: Arch, device: torch.device | str | None = None) -> SubNet:
    """A randomly initialised subnet (``device='meta'`` builds it without allocating)."""
    return SubNet(space, arch, device)


PARTS = ("subnet", "stem", "block", "head")


def build_part(space: SearchSpace, part: str, arch: Mapping | Arch | None = None,
               block: Mapping | BlockSpec | None = None) -> nn.Module:
    """A randomly initialised network to time: a whole subnet (``arch``), or the stem, one ``block`` or the head."""
    if part == "subnet":
        return build_subnet(space, arch if isinstance(arch, Arch) else Arch.from_dict(arch))
    if part == "stem":
        return make_stem(space)
    if part == "head":
        return Head(space)
    if part == "block":
        spec = block if isinstance(block, BlockSpec) else BlockSpec(**block)
        return InvertedResidual(spec, space.bn_momentum, space.bn_eps)
    raise ValueError(f"part must be one of {list(PARTS)}, got {part!r}")


def load_subnet(space: SearchSpace, arch: Arch, state_dict: Mapping[str, torch.Tensor]) -> SubNet:
    """Build the subnet of ``arch`` around the tensors of ``state_dict`` (used as they are).

    Strict like ``load_state_dict``: every key must be present, none extra, shapes equal.
    """
    net = SubNet(space, arch, device="meta")
    slots = {}
    for module_name, module in net.named_modules():
        prefix = module_name + "." if module_name else ""
        slots.update({prefix + n: (module._parameters, n) for n, p in module._parameters.items() if p is not None})
        slots.update({prefix + n: (module._buffers, n) for n, b in module._buffers.items() if b is not None})
    missing, unexpected = sorted(set(slots) - set(state_dict)), sorted(set(state_dict) - set(slots))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit arch {arch.id}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, (table, name) in slots.items():
        value = state_dict[key]
        if value.shape != table[name].shape:
            raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(table[name].shape)}")
        is_param = isinstance(table[name], nn.Parameter)
        table[name] = nn.Parameter(value) if is_param else value
    return net.eval()


def mobilenet_v3_small_baseline(width_mult: float, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ``mobilenet_v3_small`` as shipped (random init), with ``in_channels`` inputs.

    Only the first convolution changes, to take grey images; the rest (strides, widths
    times ``width_mult``, SE, the 1024-wide classifier) is the hand-designed network.
    """
    from torchvision.models import mobilenet_v3_small

    net = mobilenet_v3_small(weights=None, num_classes=num_classes, width_mult=width_mult)
    first = net.features[0][0]
    if in_channels != first.in_channels:
        net.features[0][0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride,
                                       first.padding, bias=False)
        nn.init.kaiming_normal_(net.features[0][0].weight, mode="fan_out")
    return net


def module_of(space: SearchSpace, part: Mapping[str, Any]) -> nn.Module:
    """A randomly initialised torch module for a part's :meth:`Part.to_dict` (its weights do not change its
    time): the one place that decides what a part is, for the ONNX export and the torch timing worker.

    Its BN statistics and affine parameters are drawn too (from torch's generator), as a trained network's
    are: with the fresh ones (mean 0, variance 1, scale 1, shift 0) every folded convolution bias is zero,
    the exporter shares one zero tensor through Identity nodes, and the int8 quantizer then leaves those
    biases unquantized: such a subnet ran 0.66 ms against 0.40 ms for the same arch as served."""
    if part["kind"] == "mobilenet_v3_small":
        module = mobilenet_v3_small_baseline(part["width_mult"], space.in_channels, space.num_classes)
    else:
        module = build_part(space, part["kind"], part.get("arch"), part.get("block"))
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.1)
    return module
