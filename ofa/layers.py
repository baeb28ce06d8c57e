"""Dynamic layers: weights sized for the largest choice, sliced per call.

Every forward takes the active choice as an argument and stores nothing on the
module, so concurrent calls with different subnets cannot disturb each other (in
eval mode; training mode updates BN running statistics, as any BN does). Each layer
also returns the weights a static layer of that choice would hold, which is how
extraction stays exactly equal to the supernet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .space import squeeze_channels

__all__ = [
    "DynamicBatchNorm",
    "DynamicDepthwise",
    "DynamicPointwise",
    "DynamicSE",
    "center_crop",
]


def center_crop(weight: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size``×``size`` window of a (…, K, K) kernel."""
    start = (weight.shape[-1] - size) // 2
    return weight[..., start : start + size, start : start + size]


class DynamicPointwise(nn.Module):
    """1×1 convolution whose output (and input) channels are a prefix of the full ones."""

    def __init__(self, max_in: int, max_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_out, max_in, 1, 1))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def active_weight(self, in_ch: int, out_ch: int) -> torch.Tensor:
        return self.weight[:out_ch, :in_ch]

    def forward(self, x: torch.Tensor, out_ch: int) -> torch.Tensor:
        return F.conv2d(x, self.active_weight(x.shape[1], out_ch))


class _DepthwiseSmallMap(torch.autograd.Function):
    """A depthwise convolution whose kernel is larger than its input map, with a fast weight gradient.

    On the CPU, torch's weight gradient for such a convolution (k7 on 6x6 or 3x3 maps, k5 on
    4x4: the last stages of these networks) took 5-50x its forward and a third of a training
    step (measured, batch 128). The same gradient is a depthwise convolution of the input by
    the output gradient, one group per (image, channel), summed over the images: as fast as a
    forward. The input gradient stays torch's own.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        n, c, h, w = x.shape
        k = weight.shape[-1]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [s, s], [p, p], [1, 1], False,
                                                         [0, 0], c, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            # one image of n*c channels in channels_last order (h, w, n, c): one copy of x, whatever its layout
            images = x.permute(2, 3, 0, 1).contiguous().view(1, h, w, n * c).permute(0, 3, 1, 2)
            kernels = grad.reshape(n * c, 1, *grad.shape[-2:])
            per_image = F.conv2d(images, kernels, None, 1, p, s, n * c)  # (1, n*c, >=k, >=k), channels_last
            grad_w = (per_image.permute(0, 2, 3, 1)[0, :k, :k].reshape(k, k, n, c).sum(2)
                      .permute(2, 0, 1).reshape(weight.shape))
        return grad_x, grad_w, None, None


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """``F.conv2d`` with ``groups`` = channels and same padding; see :class:`_DepthwiseSmallMap` for when the
    weight gradient takes another (equal) route."""
    k = weight.shape[-1]
    if x.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled() and k >= 5 and k > x.shape[-1]:
        return _DepthwiseSmallMap.apply(x, weight, stride, k // 2)
    return F.conv2d(x, weight, None, stride, k // 2, 1, x.shape[1])


class DynamicDepthwise(nn.Module):
    """Depthwise conv with elastic kernel size (OFA's kernel transformation).

    A smaller kernel is the centre of the next larger one passed through a learned
    (k²×k²) matrix, applied in turn 7→5→3; the matrices start as identities.
    """

    def __init__(self, max_ch: int, kernels: tuple[int, ...], stride: int) -> None:
        super().__init__()
        self.kernels = tuple(sorted(kernels))
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(max_ch, 1, self.kernels[-1], self.kernels[-1]))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        for big, small in zip(self.kernels[:0:-1], self.kernels[-2::-1]):
            self.register_parameter(f"transform_{big}to{small}", nn.Parameter(torch.eye(small * small)))

    def active_weight(self, channels: int, kernel: int) -> torch.Tensor:
        w = self.weight[:channels]
        for big, small in zip(self.kernels[:0:-1], self.kernels[-2::-1]):
            if big <= kernel:
                break
            matrix = getattr(self, f"transform_{big}to{small}")
            w = F.linear(center_crop(w, small).reshape(channels, small * small), matrix)
            w = w.reshape(channels, 1, small, small)
        return w

    def forward(self, x: torch.Tensor, kernel: int) -> torch.Tensor:
        return depthwise_conv(x, self.active_weight(x.shape[1], kernel), self.stride)


class DynamicBatchNorm(nn.BatchNorm2d):
    """BatchNorm over a prefix of its channels; shares running statistics with the full width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        momentum = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or not self.track_running_stats
        return F.batch_norm(
            x, self.running_mean[:c], self.running_var[:c], self.weight[:c], self.bias[:c],
            use_batch_stats, momentum, self.eps,
        )

    def active_state(self, channels: int) -> dict[str, torch.Tensor]:
        """The state of a static ``BatchNorm2d(channels)`` equal to this one at that width."""
        return {
            "weight": self.weight[:channels],
            "bias": self.bias[:channels],
            "running_mean": self.running_mean[:channels],
            "running_var": self.running_var[:channels],
            "num_batches_tracked": self.num_batches_tracked,
        }


class DynamicSE(nn.Module):
    """Squeeze-and-excitation over a channel prefix; its squeeze width follows the input width."""

    def __init__(self, max_ch: int, reduction: int = 4, divisor: int = 8) -> None:
        super().__init__()
        self.reduction, self.divisor = reduction, divisor
        max_squeeze = self.squeeze_channels(max_ch)
        self.reduce = nn.Conv2d(max_ch, max_squeeze, 1)
        self.expand = nn.Conv2d(max_squeeze, max_ch, 1)

    def squeeze_channels(self, channels: int) -> int:
        return squeeze_channels(channels, self.reduction, self.divisor)

    def active_state(self, channels: int) -> dict[str, torch.Tensor]:
        s = self.squeeze_channels(channels)
        return {
            "reduce.weight": self.reduce.weight[:s, :channels],
            "reduce.bias": self.reduce.bias[:s],
            "expand.weight": self.expand.weight[:channels, :s],
            "expand.bias": self.expand.bias[:channels],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.active_state(x.shape[1])
        s = x.mean((2, 3), keepdim=True)
        s = F.relu(F.conv2d(s, p["reduce.weight"], p["reduce.bias"]))
        s = F.conv2d(s, p["expand.weight"], p["expand.bias"])
        return x * F.hardsigmoid(s)
