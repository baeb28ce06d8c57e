"""Where a run starts: the checkpoint it continues from, and the checks that it computes the same thing.

A run resumes from the latest checkpoint; a single phase (``only_phase``) starts from the
checkpoint the phases before it left, kept in ``after-PHASE`` next to the latest one. A
checkpoint written by another trainer version, another configuration or another number of
processes is refused: its steps would compute something else.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .config import ConfigError, Phase, TrainConfig, config_differences

__all__ = ["TRAINER_VERSION", "Start", "check_checkpoint", "plan_start", "snapshot_dir"]

log = logging.getLogger(__name__)

# What a training step computes beyond its config. A checkpoint of another version would
# resume a different computation, so it is refused. 2: the subnets' losses of a step are
# summed (gradients accumulate, as in the reference); 1: they were averaged.
TRAINER_VERSION = 2
_TRAINER_VERSIONS = {1: "the subnets' losses of a step averaged", 2: "the subnets' losses of a step summed"}


@dataclasses.dataclass
class Start:
    """Where a run starts: phases ``phase`` up to ``stop``, at ``step`` of the first, with what the checkpoint held."""

    stop: int
    phase: int = 0
    step: int = 0
    global_step: int = 0
    buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    results: dict[str, Any] = dataclasses.field(default_factory=dict)


def snapshot_dir(folder: Path, phase: Phase) -> Path:
    """Where the checkpoint at the end of ``phase`` is kept (a run of only the next phase starts there)."""
    return folder / f"after-{phase.name}"


def check_checkpoint(ckpt: Checkpoint, folder: Path, config: TrainConfig, world: int,
                     before_phase: int | None) -> None:
    """Refuse a checkpoint (read from ``folder``) that this trainer, ``config`` and ``world`` processes would
    not continue bit for bit; with ``before_phase`` only the phases before it must agree."""
    version = ckpt.state.get("trainer_version")
    if version is None:  # written before checkpoints said; such steps may have averaged the losses
        log.warning("the checkpoint in %s does not say which trainer version wrote it; one written "
                    "before commit 4ff5671 averaged the subnets' losses, and this run sums them", folder)
    elif version != TRAINER_VERSION:
        raise ConfigError(f"the checkpoint in {folder} was written by trainer version {version} "
                          f"({_TRAINER_VERSIONS.get(version, 'unknown to this one')}); this is version "
                          f"{TRAINER_VERSION} ({_TRAINER_VERSIONS[TRAINER_VERSION]}): its steps would "
                          f"compute something else; start the run again in another output folder")
    diff = config_differences(ckpt.state.get("config", {}), config.to_dict(), before_phase)
    if diff:
        raise ConfigError(f"the checkpoint in {folder} was written with different values of "
                          f"{diff}; resume with the same configuration or use another output folder")
    if ckpt.state.get("world_size", 1) != world:
        raise ConfigError(f"the checkpoint was written by {ckpt.state.get('world_size', 1)} processes, "
                          f"this run has {world}; the data order would change")


def _check_phase_start(ckpt: Checkpoint | None, folder: Path, phases: tuple[Phase, ...], idx: int,
                       resume: bool) -> None:
    """Refuse to run only phase ``idx`` unless the checkpoint ends where it starts (or is inside it, resuming)."""
    name = phases[idx].name
    done = ckpt.state["phase_index"] if ckpt is not None else 0
    if resume and done != idx:
        raise ConfigError(f"resuming phase {name!r}: the checkpoint is in phase "
                          f"{phases[min(done, len(phases) - 1)].name!r}")
    if not resume and (done != idx or (ckpt is not None and ckpt.state["step_in_phase"] != 0)):
        have = (f"the checkpoint in {folder} ends after {done} complete phase(s)"
                if ckpt is not None else f"{folder} holds no checkpoint")
        raise ConfigError(f"phase {name!r} starts from the weights that the {idx} phase(s) "
                          f"before it leave, but {have}; run the phases in order (or resume)")


def plan_start(config: TrainConfig, folder: Path, world: int, resume: bool = False,
               only_phase: str | None = None) -> tuple[Start, Checkpoint | None]:
    """Where a run with checkpoints in ``folder`` starts, and the checkpoint whose weights it starts from."""
    phases = config.phases
    idx = phases.index(config.phase(only_phase)) if only_phase is not None else None
    ckpt = load_checkpoint(folder) if (resume or only_phase) else None
    if resume and ckpt is None:
        raise ConfigError(f"cannot resume: no checkpoint in {folder}")
    at = (ckpt.state["phase_index"], ckpt.state["step_in_phase"]) if ckpt is not None else None
    if idx and not resume and at != (idx, 0):  # the run went further: start from the phase-end snapshot
        ckpt = load_checkpoint(snapshot_dir(folder, phases[idx - 1])) or ckpt
    start = Start(stop=len(phases))
    if ckpt is not None:
        check_checkpoint(ckpt, folder, config, world, None if resume else idx)
        saved = ckpt.state.get("results", {})
        start.global_step = ckpt.state["global_step"]
        start.results = {p.name: saved[p.name] for p in phases if p.name in saved}  # JSON sorted them
        if resume:
            start.phase, start.step = ckpt.state["phase_index"], ckpt.state["step_in_phase"]
            start.buffers = ckpt.optimizer
            log.info("resuming at phase %d, step %d", start.phase, start.step)
    if idx is not None:
        _check_phase_start(ckpt, folder, phases, idx, resume)
        start.phase, start.stop = idx, idx + 1  # start.step is the checkpoint's only when resuming
    return start, ckpt
