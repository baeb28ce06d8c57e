"""Import supernets of the reference implementation (PyPI ``ofa``, ``OFAMobileNetV3``).

Users already hold pretrained ImageNet supernets in that layout (widths 1.0 and 1.2), and its
pretrained accuracy predictor. The mapping between its state-dict names and ours is one
explicit table, checked both ways: every key of ours must be filled, every key of theirs
must be used, every shape must agree. :func:`import_reference` makes a servable artifact of
a checkpoint: the weights, the space, ImageNet's data description, a calibration set drawn
from a folder of training images, and the predictor when given.
"""
from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from .space import SearchSpace, get_space
from .supernet import Supernet

__all__ = ["REFERENCE_EVAL_CROP", "REFERENCE_SPACES", "ReferenceImportError", "import_reference",
           "load_reference_state_dict", "read_state_dict", "reference_key_map", "reference_space"]

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


def import_reference(checkpoint: str | Path, out: str | Path, space: SearchSpace | None = None,
                     calib_dir: str | Path | None = None, calib_images: int = 2000, seed: int = 0,
                     accuracy_predictor: str | Path | None = None) -> dict[str, Any]:
    """Write the artifact ``out`` from a reference checkpoint (the space found from its shapes unless
    given); with ``calib_dir``, ``calib_images`` images drawn from it with ``seed`` are its calibration
    set (without, it can be profiled but not served); with ``accuracy_predictor`` (the reference's
    ``.pth``), that predictor is its accuracy predictor. Returns what was written."""
    from ._io import sha256_file
    from .artifact import ACCURACY_PREDICTOR, add_file, write_artifact
    from .data import folder_calibration, imagenet_spec
    from .predict.reference_predictor import from_reference

    if not 1 <= calib_images <= 100_000:
        raise ValueError(f"calib_images must be in 1..100000, got {calib_images}")
    t0 = time.perf_counter()
    state = read_state_dict(checkpoint)
    space = space or reference_space(state)
    net = load_reference_state_dict(Supernet(space), state)
    data = imagenet_spec(max(space.resolutions))
    calib, skipped = (None, 0) if calib_dir is None else folder_calibration(calib_dir, calib_images,
                                                                            data.image_size, seed)
    source = {"checkpoint": Path(checkpoint).name, "sha256": sha256_file(Path(checkpoint))}
    config = {"imported_from": "reference OFAMobileNetV3", **source, "dataset": data.name, "seed": seed,
              "image_size": data.image_size, "eval_crop": REFERENCE_EVAL_CROP,
              "calib_dir": str(calib_dir) if calib_dir else None, "calib_images": 0 if calib is None else len(calib)}
    write_artifact(Path(out), net, data, calib, config, {})
    summary = {"out": str(out), "space": space.name, "tensors": len(net.state_dict()), **source,
               "calibration_images": config["calib_images"], "unreadable_images": skipped}
    if accuracy_predictor is not None:
        pred_state = {k: v.float().numpy() for k, v in read_state_dict(accuracy_predictor, "accuracy_predictor").items()}
        pred = from_reference(pred_state, space, {"checkpoint": Path(accuracy_predictor).name,
                                                  "sha256": sha256_file(Path(accuracy_predictor))})
        add_file(Path(out), ACCURACY_PREDICTOR, pred.to_bytes())
        summary["accuracy_predictor"] = pred.family
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary
