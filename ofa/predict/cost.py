"""Exact MACs and parameter counts of archs, analytic and batched over encodings.

Convention (the reference's counter): MACs of convolutions and linear layers only,
biases, BN and activations excluded; parameters are every trainable weight of the
static subnet (BN affine included). ``count_macs_params`` counts the same on a real
module with hooks, which is how the tables are checked.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..space import Arch, SearchSpace

__all__ = ["CostModel", "count_macs_params", "gather_slots"]


def gather_slots(space: SearchSpace, codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Sum a per-slot table over the active blocks of each encoded arch.

    ``table`` is (resolutions, slots, kernels, expands) or (slots, kernels, expands);
    slots past a stage's depth contribute nothing, whatever their code says.
    """
    codes = np.asarray(codes)
    s = space.num_slots
    active = space.active_mask(codes)
    k = np.clip(codes[:, :s], 0, None)
    e = np.clip(codes[:, s : 2 * s], 0, None)
    slots = np.arange(s)[None, :]
    values = table[codes[:, -1][:, None], slots, k, e] if table.ndim == 4 else table[slots, k, e]
    return np.where(active, values, 0).sum(axis=1)


def _out_size(size: int, stride: int) -> int:
    # same padding (k // 2) with an odd kernel: floor((size - 1) / stride) + 1
    return (size - 1) // stride + 1


class CostModel:
    """Per-slot MAC and parameter tables of a space; cost of N archs is one gather + sum."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        n_res, n_k, n_e = len(space.resolutions), len(space.kernel_choices), len(space.expand_choices)
        self.slot_macs = np.zeros((n_res, space.num_slots, n_k, n_e), dtype=np.int64)
        self.slot_params = np.zeros((space.num_slots, n_k, n_e), dtype=np.int64)
        self.fixed_macs = np.zeros(n_res, dtype=np.int64)
        self.fixed_params = self._fixed_params()
        for ri, r in enumerate(space.resolutions):
            self.fixed_macs[ri] = self._fill_resolution(ri, r)

    def _fixed_params(self) -> int:
        sp = self.space
        stem = sp.in_channels * sp.stem_width * 9 + 2 * sp.stem_width
        first = sp.first_block()
        first_p = first.mid_ch * 9 + 2 * first.mid_ch + first.mid_ch * first.out_ch + 2 * first.out_ch
        last = sp.stages[-1].width
        head = (last * sp.final_expand_width + 2 * sp.final_expand_width
                + sp.final_expand_width * sp.head_width + sp.head_width * sp.num_classes + sp.num_classes)
        return stem + first_p + head

    def _fill_resolution(self, ri: int, r: int) -> int:
        sp = self.space
        h = _out_size(r, sp.stem_stride)
        first = sp.first_block()
        fixed = h * h * sp.in_channels * sp.stem_width * 9
        fixed += h * h * first.mid_ch * 9 + h * h * first.mid_ch * first.out_ch
        for s, (stage, stage_in) in enumerate(zip(sp.stages, sp.stage_in_channels())):
            for j in range(sp.max_depth):
                in_ch = stage_in if j == 0 else stage.width
                h_out = _out_size(h, stage.stride) if j == 0 else h
                slot = s * sp.max_depth + j
                for ki, k in enumerate(sp.kernel_choices):
                    for ei, e in enumerate(sp.expand_choices):
                        mid = sp.mid_channels(in_ch, e)
                        se = sp.se_channels(mid) if stage.se else 0
                        macs = h * h * in_ch * mid + h_out * h_out * mid * (k * k + stage.width)
                        self.slot_macs[ri, slot, ki, ei] = macs + 2 * mid * se
                        self.slot_params[slot, ki, ei] = (
                            in_ch * mid + 4 * mid + mid * k * k + mid * stage.width
                            + 2 * stage.width + (2 * mid * se + se + mid if se else 0)
                        )
                if j == 0:
                    h = h_out
        last = sp.stages[-1].width
        fixed += h * h * last * sp.final_expand_width
        fixed += sp.final_expand_width * sp.head_width + sp.head_width * sp.num_classes
        return fixed

    def macs(self, codes: np.ndarray) -> np.ndarray:
        """MACs of each encoded arch (int64, shape (N,))."""
        codes = np.asarray(codes)
        return self.fixed_macs[codes[:, -1]] + gather_slots(self.space, codes, self.slot_macs)

    def params(self, codes: np.ndarray) -> np.ndarray:
        """Parameter count of each encoded arch (int64, shape (N,))."""
        return self.fixed_params + gather_slots(self.space, codes, self.slot_params)

    def arch_macs(self, arch: Arch) -> int:
        return int(self.macs(self.space.encode([arch]))[0])

    def arch_params(self, arch: Arch) -> int:
        return int(self.params(self.space.encode([arch]))[0])

    def of(self, archs: Sequence[Arch]) -> tuple[np.ndarray, np.ndarray]:
        """(MACs, params) of many archs."""
        codes = self.space.encode(archs)
        return self.macs(codes), self.params(codes)


def count_macs_params(module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Count conv/linear MACs (batch 1) with forward hooks, and trainable parameters."""
    import torch
    from torch import nn

    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = m.weight.shape[2] * m.weight.shape[3]
        total += out[0].numel() * k * m.in_channels // m.groups

    def linear_hook(m: nn.Linear, _inp, _out) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, *input_shape))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, params
