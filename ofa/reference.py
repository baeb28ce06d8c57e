"""Import supernets of the reference implementation (PyPI ``ofa``, ``OFAMobileNetV3``).

Users already hold pretrained ImageNet supernets in that layout (widths 1.0 and 1.2), and its
pretrained accuracy predictor. The mapping between its state-dict names and ours is one
explicit table, checked both ways: every key of ours must be filled, every key of theirs
must be used, every shape must agree. :mod:`ofa.jobs.import_reference` makes a servable
artifact of a checkpoint with it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping

import torch

from .space import SearchSpace, get_space
from .supernet import Supernet

__all__ = ["REFERENCE_EVAL_CROP", "REFERENCE_SPACES", "ReferenceImportError", "load_reference_state_dict", "read_state_dict", "reference_key_map", "reference_space"]

REFERENCE_SPACES = ("mbv3-imagenet", "mbv3-imagenet-w1.2")  # the reference's released OFAMobileNetV3 widths
REFERENCE_EVAL_CROP = 0.875  # its evaluation: resize to resolution / 0.875, centre crop to the resolution

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ReferenceImportError(ValueError):
    """A reference state dict that does not fit the target supernet."""


def _bn(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{k}": f"{theirs}.{k}" for k in _BN}


def reference_key_map(supernet: Supernet) -> dict[str, str]:
    """Our state-dict key → the reference ``OFAMobileNetV3`` key, for every tensor."""
    m = {"stem.conv.weight": "first_conv.conv.weight", **_bn("stem.bn", "first_conv.bn")}
    m["first_block.depthwise.conv.weight"] = "blocks.0.conv.depth_conv.conv.weight"
    m.update(_bn("first_block.depthwise.bn", "blocks.0.conv.depth_conv.bn"))
    m["first_block.project.conv.weight"] = "blocks.0.conv.point_linear.conv.weight"
    m.update(_bn("first_block.project.bn", "blocks.0.conv.point_linear.bn"))
    for i, block in enumerate(supernet.blocks):
        ours, theirs = f"blocks.{i}", f"blocks.{i + 1}.conv"
        m[f"{ours}.expand.weight"] = f"{theirs}.inverted_bottleneck.conv.conv.weight"
        m.update(_bn(f"{ours}.expand_bn", f"{theirs}.inverted_bottleneck.bn.bn"))
        m[f"{ours}.depthwise.weight"] = f"{theirs}.depth_conv.conv.conv.weight"
        for name, _ in block.depthwise.named_parameters():
            if name.startswith("transform_"):
                m[f"{ours}.depthwise.{name}"] = f"{theirs}.depth_conv.conv.{name[len('transform_'):]}_matrix"
        m.update(_bn(f"{ours}.depthwise_bn", f"{theirs}.depth_conv.bn.bn"))
        if block.se is not None:
            for p in ("reduce.weight", "reduce.bias", "expand.weight", "expand.bias"):
                m[f"{ours}.se.{p}"] = f"{theirs}.depth_conv.se.fc.{p}"
        m[f"{ours}.project.weight"] = f"{theirs}.point_linear.conv.conv.weight"
        m.update(_bn(f"{ours}.project_bn", f"{theirs}.point_linear.bn.bn"))
    m["head.final_expand.conv.weight"] = "final_expand_layer.conv.weight"
    m.update(_bn("head.final_expand.bn", "final_expand_layer.bn"))
    m["head.feature_mix.weight"] = "feature_mix_layer.conv.weight"
    m["head.classifier.weight"] = "classifier.linear.weight"
    m["head.classifier.bias"] = "classifier.linear.bias"
    return m


def _normalise(key: str) -> str:
    # Released checkpoints predate a rename of the block attribute.
    key = key.removeprefix("module.")
    return key.replace(".mobile_inverted_conv.", ".conv.")


@torch.no_grad()
def load_reference_state_dict(supernet: Supernet, state_dict: Mapping[str, torch.Tensor]) -> Supernet:
    """Copy a reference ``OFAMobileNetV3`` state dict into ``supernet`` (strict)."""
    theirs = {_normalise(k): v for k, v in state_dict.items()}
    key_map = reference_key_map(supernet)
    missing = sorted(t for t in key_map.values() if t not in theirs)
    unexpected = sorted(set(theirs) - set(key_map.values()))
    if missing or unexpected:
        raise ReferenceImportError(
            f"not an OFAMobileNetV3 state dict for space {supernet.space.name!r}: "
            f"{len(missing)} missing keys (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})"
        )
    ours = supernet.state_dict()
    for our_key, their_key in key_map.items():
        src = theirs[their_key]
        if tuple(src.shape) != tuple(ours[our_key].shape):
            raise ReferenceImportError(
                f"{their_key} has shape {tuple(src.shape)}, expected {tuple(ours[our_key].shape)} "
                f"(for {our_key} in space {supernet.space.name!r})"
            )
        ours[our_key].copy_(src)
    return supernet


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a reference ``.pth`` (a state dict, or ``{"state_dict": ...}``); ``weights_only``:
    tensors and containers only, no arbitrary objects are built."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # torch's raises several kinds
        raise ReferenceImportError(f"{what} {path}: cannot be read as a torch state dict ({str(e)[:200]})") from None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ReferenceImportError(f"{what} {path}: not a state dict of tensors")
    return ckpt


def reference_space(state: Mapping[str, torch.Tensor]) -> SearchSpace:
    """The registered reference space (:data:`REFERENCE_SPACES`) whose stem and head widths ``state`` has."""
    state = {_normalise(k): v for k, v in state.items()}
    stem, head = state.get("first_conv.conv.weight"), state.get("classifier.linear.weight")
    if stem is None or head is None or stem.ndim != 4 or head.ndim != 2:
        raise ReferenceImportError("not an OFAMobileNetV3 state dict: first_conv.conv.weight or "
                                   "classifier.linear.weight is missing")
    for name in REFERENCE_SPACES:
        space = get_space(name)
        if (space.stem_width, space.head_width) == (stem.shape[0], head.shape[1]):
            return space
    raise ReferenceImportError(f"the checkpoint's stem has {stem.shape[0]} channels and its classifier {head.shape[1]} "
                               f"inputs; the reference spaces have " + ", ".join(
                                   f"{n}: {get_space(n).stem_width} and {get_space(n).head_width}"
                                   for n in REFERENCE_SPACES))
