"""Exact MACs and parameter counts of archs, analytic and batched over encodings.

Convention (the reference's counter): MACs of convolutions and linear layers only,
biases, BN and activations excluded; parameters are every trainable weight of the
static subnet (BN affine included). ``count_macs_params`` counts the same on a real
module with hooks, which is how the tables are checked.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..space import Arch, BlockSpec, SearchSpace

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


def _block_macs(b: BlockSpec, h_in: int, h_out: int) -> int:
    # expand at the input size; depthwise, project and SE (two 1x1 convs on the pooled map) after the stride
    return (h_in * h_in * b.in_ch * b.mid_ch + h_out * h_out * b.mid_ch * (b.kernel * b.kernel + b.out_ch)
            + 2 * b.mid_ch * b.se_ch)


def _block_params(b: BlockSpec) -> int:
    # convs without bias and three BNs (2 per channel); the SE's convs have biases
    se = 2 * b.mid_ch * b.se_ch + b.se_ch + b.mid_ch if b.se_ch else 0
    return (b.in_ch * b.mid_ch + 4 * b.mid_ch + b.mid_ch * b.kernel * b.kernel + b.mid_ch * b.out_ch
            + 2 * b.out_ch + se)


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
        h = sp.stem_size(r)
        first = sp.first_block()
        fixed = h * h * sp.in_channels * sp.stem_width * 9
        fixed += h * h * first.mid_ch * 9 + h * h * first.mid_ch * first.out_ch
        for slot, ki, ei, b in sp.slot_blocks(r):
            self.slot_macs[ri, slot.index, ki, ei] = _block_macs(b, slot.in_size, slot.out_size)
            self.slot_params[slot.index, ki, ei] = _block_params(b)
        h = sp.head_size(r)
        fixed += h * h * sp.stages[-1].width * sp.final_expand_width
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
