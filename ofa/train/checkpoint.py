"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON for the rest.

A checkpoint is a pair of files named by global step (``model-STEP.safetensors``
holding the supernet and the optimizer's momentum buffers) plus ``checkpoint.json``,
which names the current pair and is replaced last (temp file + ``os.replace``). A kill
at any moment leaves either the previous checkpoint or the new one, never a mix; the
temporary files a killed write leaves are removed by the next save.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._io import atomic_save_tensors, atomic_write_text

__all__ = ["Checkpoint", "has_checkpoint", "load_checkpoint", "momentum_buffers", "restore_momentum", "save_checkpoint"]

INDEX = "checkpoint.json"
TEACHER = "teacher.safetensors"  # the full net the later phases distil from, kept with the checkpoints


@dataclass
class Checkpoint:
    """What a resumed run needs: where it was, the weights, the optimizer's buffers."""

    state: dict[str, Any]                   # phase, step_in_phase, global_step, metrics, config
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]      # momentum buffer per parameter name


def momentum_buffers(net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's momentum buffers by parameter name: the part of its state a checkpoint keeps."""
    names = {id(p): n for n, p in net.named_parameters()}
    return {names[id(p)]: s["momentum_buffer"] for p, s in opt.state.items()
            if s.get("momentum_buffer") is not None}


def restore_momentum(net: torch.nn.Module, opt: torch.optim.Optimizer, buffers: dict[str, torch.Tensor]) -> None:
    """Put :func:`momentum_buffers` back into a new optimizer over ``net`` (on its parameters' devices)."""
    for name, p in net.named_parameters():
        if name in buffers:
            opt.state[p]["momentum_buffer"] = buffers[name].to(p.device).clone()


def save_checkpoint(folder: Path, state: dict[str, Any], model: dict[str, torch.Tensor],
                    optimizer: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    step = int(state["global_step"])
    name = f"model-{step:08d}.safetensors"
    tensors = {f"model.{k}": v for k, v in model.items()}
    tensors.update({f"optim.{k}": v for k, v in optimizer.items()})
    atomic_save_tensors(tensors, folder / name, {"global_step": str(step)})
    atomic_write_text(folder / INDEX, json.dumps({**state, "file": name}, indent=1, sort_keys=True))
    for old in folder.glob("model-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    for temp in folder.glob(".*.tmp"):  # left by a run killed while writing (this run is the folder's writer)
        temp.unlink(missing_ok=True)
    return folder / name


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint to resume from."""
    return (folder / INDEX).exists()


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The latest complete checkpoint in ``folder``, or None if there is none."""
    index = folder / INDEX
    if not index.exists():
        return None
    try:
        state = json.loads(index.read_text())
        tensors = load_file(str(folder / state["file"]))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ValueError(f"checkpoint in {folder} is unreadable: {e}") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
    return Checkpoint(state, model, optim)
