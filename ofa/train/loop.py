"""Progressive shrinking: the training loop of ``ofa train``.

Every random choice of a step (data order, subnets, resolution, augmentation,
dropout) is derived from ``(seed, phase, step)`` — and the rank, where ranks must
differ — so a run resumed from a checkpoint continues bit for bit on CPU (on CUDA,
non-deterministic kernels make it equal only up to float rounding), and every rank
of a ``torchrun`` job samples the same subnets without communicating. Checkpoints
and the teacher are read from ``--out`` by every rank: a multi-node job needs it on
shared storage.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from .._io import atomic_save_tensors, sha256_file
from ..data import DataSpec, augment, calibration_images, load_dataset, prepare_batch, split_validation
from ..evaluate import subnet_accuracy
from ..space import Arch, SearchSpace, get_space
from ..subnet import load_subnet
from ..supernet import Supernet
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, Phase, TrainConfig, config_differences

__all__ = ["Trainer", "train"]

log = logging.getLogger(__name__)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
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


def phase_space(space: SearchSpace, phase: Phase) -> SearchSpace:
    """The space restricted to the choices a phase trains (its archs are valid in ``space``)."""
    for field, allowed in (("kernels", space.kernel_choices), ("expands", space.expand_choices),
                           ("depths", space.depth_choices)):
        bad = sorted(set(getattr(phase, field)) - set(allowed))
        if bad:
            raise ConfigError(f"phases.{phase.name}.{field} has {bad}, not in the space's choices {list(allowed)}")
    return dataclasses.replace(
        space,
        kernel_choices=phase.kernels or space.kernel_choices,
        expand_choices=phase.expands or space.expand_choices,
        depth_choices=phase.depths or space.depth_choices,
    )


def lr_at(phase: Phase, step: int, total: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero, as a pure function of the step."""
    warm = int(phase.warmup_epochs * steps_per_epoch)
    if step < warm:
        return phase.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.5 * phase.lr * (1 + math.cos(math.pi * t))


def _check_config(config: TrainConfig) -> None:
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {config.batch_size}")
    if not config.phases:
        raise ConfigError("phases must not be empty")
    names = [p.name for p in config.phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"phase names must be unique, got {names}")
    for p in config.phases:
        if p.epochs <= 0 or p.lr <= 0:
            raise ConfigError(f"phases.{p.name}: epochs and lr must be > 0, got {p.epochs} and {p.lr}")
        if p.subnets_per_step < 1:
            raise ConfigError(f"phases.{p.name}.subnets_per_step must be >= 1, got {p.subnets_per_step}")
        if p.warmup_epochs > p.epochs:
            raise ConfigError(f"phases.{p.name}.warmup_epochs must be <= its epochs ({p.epochs}), "
                              f"got {p.warmup_epochs}")
        if config.sandwich and p.subnets_per_step < 2 and p.name != config.phases[0].name:
            raise ConfigError(f"phases.{p.name}: the sandwich rule needs subnets_per_step >= 2")
        phase_space(get_space(config.space), p)  # choices outside the space fail now, not hours later
    allowed = get_space(config.space).resolutions
    bad = sorted(set(config.resolutions) - set(allowed))
    if bad or len(set(config.resolutions)) != len(config.resolutions):
        raise ConfigError(f"resolutions must be distinct values from the space's {list(allowed)}, "
                          f"got {list(config.resolutions)}")
    for key in ("checkpoint_every", "log_every", "calib_size", "eval_batch_size", "val_size", "image_size"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(config, key)}")
    if not 0 <= config.label_smoothing < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {config.momentum}")
    if config.nesterov and config.momentum == 0:
        raise ConfigError("nesterov needs momentum > 0: set momentum in (0, 1) or nesterov=false")
    if config.evaluate_phases not in ("all", "last"):
        raise ConfigError(f"evaluate_phases must be 'all' or 'last', got {config.evaluate_phases!r}")


# What a training step computes beyond its config. A checkpoint of another version would
# resume a different computation, so it is refused. 2: the subnets' losses of a step are
# summed (gradients accumulate, as in the reference); 1: they were averaged.
TRAINER_VERSION = 2
_TRAINER_VERSIONS = {1: "the subnets' losses of a step averaged", 2: "the subnets' losses of a step summed"}



class Trainer:
    """One run of progressive shrinking into ``out`` (checkpoints, metrics, artifact)."""

    def __init__(self, config: TrainConfig, out: str | Path, progress: bool = True) -> None:
        _check_config(config)
        self.config, self.out, self.progress = config, Path(out), progress
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = self._device()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if config.threads:
            torch.set_num_threads(config.threads)
        base = get_space(config.space)
        if self.world > 1 and self.rank != 0:
            dist.barrier()  # rank 0 prepares (decompresses, or downloads) the dataset first
        full, self.spec = load_dataset(config.dataset, config.data_dir or None, True, config.image_size)
        if self.world > 1 and self.rank == 0:
            dist.barrier()
        self.space = self._fit_space(base, self.spec, config.resolutions)
        self.train_set, self.val_set = split_validation(full, config.val_size, config.seed)
        if config.train_subset:
            self.train_set = self.train_set.subset(torch.arange(min(config.train_subset, len(self.train_set))))
        self.calib = calibration_images(self.train_set, config.calib_size, config.seed)
        self.steps_per_epoch = len(self.train_set) // (config.batch_size * self.world)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"batch_size {config.batch_size} x {self.world} processes exceeds the "
                              f"{len(self.train_set)} training images")
        torch.manual_seed(config.seed)
        self.supernet = Supernet(self.space).to(self.device).to(memory_format=torch.channels_last)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.teacher: nn.Module | None = None
        self._teacher_digest: str | None = None

    # ---- set-up helpers ----------------------------------------------------
    def _device(self) -> torch.device:
        want = self.config.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {want!r} requested but CUDA is not available; use device=cpu")
            if want == "cuda":
                want = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(torch.device(want))
        elif want != "cpu":
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {want!r}")
        return torch.device(want)

    @staticmethod
    def _fit_space(space: SearchSpace, spec: DataSpec, resolutions: tuple[int, ...]) -> SearchSpace:
        if resolutions and tuple(sorted(resolutions)) != space.resolutions:
            space = dataclasses.replace(space, name=f"{space.name}@{'-'.join(map(str, sorted(resolutions)))}px",
                                        resolutions=tuple(sorted(resolutions)))
        if (space.in_channels, space.num_classes) == (spec.channels, spec.num_classes):
            return space
        log.info("adapting space %s to %d channels and %d classes of %s", space.name, spec.channels,
                 spec.num_classes, spec.name)
        return dataclasses.replace(space, name=f"{space.name}@{spec.name}", in_channels=spec.channels,
                                   num_classes=spec.num_classes)

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def _optimizer(self, phase: Phase) -> torch.optim.SGD:
        decay, no_decay = [], []
        for name, p in self.supernet.named_parameters():
            (no_decay if p.dim() <= 1 or "transform_" in name else decay).append(p)
        return torch.optim.SGD([{"params": decay, "weight_decay": self.config.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}],
                               lr=phase.lr, momentum=self.config.momentum, nesterov=self.config.nesterov)

    def _optimizer_state(self, opt: torch.optim.SGD) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.supernet.named_parameters()}
        return {names[id(p)]: s["momentum_buffer"] for p, s in opt.state.items()
                if s.get("momentum_buffer") is not None}

    def _restore_optimizer(self, opt: torch.optim.SGD, buffers: dict[str, torch.Tensor]) -> None:
        for name, p in self.supernet.named_parameters():
            if name in buffers:
                opt.state[p]["momentum_buffer"] = buffers[name].to(p.device).clone()

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            path = self.ckpt_dir / "teacher.safetensors"
            if not path.exists():
                raise ConfigError("distillation needs the teacher that the 'full' phase writes "
                                  f"({path} is missing): run the full phase first")
            want = self._teacher_digest
            if want is not None and sha256_file(path) != want:
                raise ConfigError(f"{path} is not the teacher this run's full phase wrote (sha256 differs)")
            try:
                state = load_file(str(path), device=str(self.device))
            except SafetensorError as e:
                raise ConfigError(f"{path} is unreadable: {e}") from None
            self.teacher = load_subnet(self.space, self.space.largest(), state).to(
                memory_format=torch.channels_last).eval()
        return self.teacher

    def _save_teacher(self) -> None:
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in
                     self.supernet.subnet_state_dict(self.space.largest()).items()}
            atomic_save_tensors(state, self.ckpt_dir / "teacher.safetensors")
        if self.world > 1:
            dist.barrier()
        self._teacher_digest = sha256_file(self.ckpt_dir / "teacher.safetensors")
        self.teacher = None

    # ---- the run -------------------------------------------------------------
    def run(self, resume: bool = False, only_phase: str | None = None) -> dict[str, Any]:
        phases = list(self.config.phases)
        idx = phases.index(self.config.phase(only_phase)) if only_phase is not None else None
        ckpt = load_checkpoint(self.ckpt_dir) if (resume or only_phase) else None
        if resume and ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {self.ckpt_dir}")
        at = (ckpt.state["phase_index"], ckpt.state["step_in_phase"]) if ckpt is not None else None
        if idx and not resume and at != (idx, 0):  # the run went further: start from the phase-end snapshot
            ckpt = load_checkpoint(self._snapshot_dir(phases[idx - 1])) or ckpt
        start_phase, start_step, global_step, buffers = 0, 0, 0, {}
        results: dict[str, Any] = {}
        if ckpt is not None:
            version = ckpt.state.get("trainer_version")
            if version is None:  # written before checkpoints said; such steps may have averaged the losses
                log.warning("the checkpoint in %s does not say which trainer version wrote it; one written "
                            "before commit 4ff5671 averaged the subnets' losses, and this run sums them",
                            self.ckpt_dir)
            elif version != TRAINER_VERSION:
                raise ConfigError(f"the checkpoint in {self.ckpt_dir} was written by trainer version {version} "
                                  f"({_TRAINER_VERSIONS.get(version, 'unknown to this one')}); this is version "
                                  f"{TRAINER_VERSION} ({_TRAINER_VERSIONS[TRAINER_VERSION]}): its steps would "
                                  f"compute something else; start the run again in another --out")
            diff = config_differences(ckpt.state.get("config", {}), self.config.to_dict(),
                                       None if resume else idx)
            if diff:
                raise ConfigError(f"the checkpoint in {self.ckpt_dir} was written with different values of "
                                  f"{diff}; resume with the same configuration or use another --out")
            if ckpt.state.get("world_size", 1) != self.world:
                raise ConfigError(f"the checkpoint was written by {ckpt.state.get('world_size', 1)} processes, "
                                  f"this run has {self.world}; the data order would change")
            self.supernet.load_state_dict(ckpt.model)
            global_step, saved = ckpt.state["global_step"], ckpt.state.get("results", {})
            results = {p.name: saved[p.name] for p in phases if p.name in saved}  # JSON sorted them
            self._teacher_digest = ckpt.state.get("teacher_sha256")
            if resume:
                start_phase, start_step = ckpt.state["phase_index"], ckpt.state["step_in_phase"]
                buffers = ckpt.optimizer
                log.info("resuming at phase %d, step %d", start_phase, start_step)
        stop_phase = len(phases)
        if idx is not None:
            done = ckpt.state["phase_index"] if ckpt is not None else 0
            if resume and done != idx:
                raise ConfigError(f"--resume --phase {only_phase}: the checkpoint is in phase "
                                  f"{phases[min(done, len(phases) - 1)].name!r}")
            if not resume and (done != idx or (ckpt is not None and ckpt.state["step_in_phase"] != 0)):
                have = (f"the checkpoint in {self.ckpt_dir} ends after {done} complete phase(s)"
                        if ckpt is not None else f"{self.ckpt_dir} holds no checkpoint")
                raise ConfigError(f"phase {only_phase!r} starts from the weights that the {idx} phase(s) "
                                  f"before it leave, but {have}; run the phases in order (or --resume)")
            start_phase, start_step = idx, start_step if resume else 0
            stop_phase = idx + 1
        for pi in range(start_phase, stop_phase):
            global_step, results[phases[pi].name] = self._run_phase(
                pi, phases[pi], start_step if pi == start_phase else 0, global_step,
                buffers if pi == start_phase else {}, results)
        if self.rank == 0 and stop_phase == len(phases):
            self.write_artifact(results)
        if self.world > 1:
            dist.barrier()
        return results

    def _run_phase(self, pi: int, phase: Phase, start: int, global_step: int,
                   buffers: dict[str, torch.Tensor], results: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        cfg = self.config
        sub = phase_space(self.space, phase)
        total = max(1, round(phase.epochs * self.steps_per_epoch))
        if phase.reorder and start == 0:
            self.supernet.reorder_channels()
        model: nn.Module = Objective(self.supernet, cfg.label_smoothing)
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = self._optimizer(phase)
        self._restore_optimizer(opt, buffers)
        use_teacher = phase.kd_ratio > 0 and not cfg.sandwich
        teacher = self._teacher() if use_teacher else None
        amp = self.device.type == "cuda" and cfg.amp
        amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
        bar = tqdm(total=total, initial=start, desc=f"{phase.name:8s}", unit="step",
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        self.supernet.train()
        t_phase = t_last = time.perf_counter()
        n_last, n_steps, loss_sum = 0, 0, 0.0  # since the last metrics line (or the resume)
        for step in range(start, total):
            epoch, b = divmod(step, self.steps_per_epoch)
            order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(
                _seed(cfg.seed, pi, epoch)))[self.rank :: self.world]
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            rng = np.random.default_rng(_seed(cfg.seed, pi, step, 1))
            archs = self._sample(sub, rng, phase.subnets_per_step)
            torch.manual_seed(_seed(cfg.seed, pi, step, 2, self.rank))
            images = augment(self.train_set.images[idx], cfg.augment_padding, cfg.augment_flip)
            x = prepare_batch(images, archs[0].resolution, self.spec, self.device)
            y = self.train_set.labels[idx].to(self.device)
            if cfg.trace:
                self._trace(phase, step, archs, idx)
            lr = lr_at(phase, step, total, self.steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp):
                soft = None
                if teacher is not None:
                    with torch.no_grad():
                        soft = teacher(x)
                loss = model(x, y, archs, phase.kd_ratio, soft, cfg.sandwich)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            global_step += 1
            loss_sum += loss.item() / len(archs)  # logged per subnet, comparable across phases
            n_last += len(idx)
            n_steps += 1
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                dt = time.perf_counter() - t_last
                mean_loss = loss_sum / n_steps
                if self.world > 1:  # every rank logs at the same steps: the mean over the global batch
                    mean = torch.tensor([mean_loss], device=self.device)
                    dist.all_reduce(mean)
                    mean_loss = mean.item() / self.world
                record = {"phase": phase.name, "step": step + 1, "steps": total, "epoch": round((step + 1) / self.steps_per_epoch, 3),
                          "loss": mean_loss, "lr": lr, "img_per_s": n_last * self.world / dt, "global_step": global_step}
                bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}")
                self._log(record)
                t_last, n_last, n_steps, loss_sum = time.perf_counter(), 0, 0, 0.0
            if global_step % cfg.checkpoint_every == 0 and step + 1 < total:
                self._checkpoint(pi, step + 1, global_step, opt, results)
        bar.close()
        del model  # releases the DDP reducer's hooks before the next phase wraps the net again
        if phase.name == "full":
            self._save_teacher()
        evaluate = cfg.evaluate_phases == "all" or pi == len(cfg.phases) - 1
        phase_results = self.evaluate_corners(sub) if self.rank == 0 and evaluate else {}
        self._log({"phase": phase.name, "event": "phase_end", "val_accuracy": phase_results,
                   "global_step": global_step, "seconds": round(time.perf_counter() - t_phase, 1),
                   "steps": total - start})
        results = {**results, phase.name: phase_results}
        self._checkpoint(pi + 1, 0, global_step, None, results)
        self._checkpoint(pi + 1, 0, global_step, None, results, self._snapshot_dir(phase))
        return global_step, phase_results

    def _snapshot_dir(self, phase: Phase) -> Path:
        """Where the checkpoint at the end of ``phase`` is kept (``--phase`` of the next one starts there)."""
        return self.ckpt_dir / f"after-{phase.name}"

    def _trace(self, phase: Phase, step: int, archs: list[Arch], idx: torch.Tensor) -> None:
        weights = hashlib.sha256()  # the weights this step starts from: equal on every rank under DDP
        for p in self.supernet.parameters():
            weights.update(p.detach().cpu().numpy().tobytes())
        record = {"rank": self.rank, "phase": phase.name, "step": step, "archs": [a.id for a in archs],
                  "resolution": archs[0].resolution,
                  "batch": hashlib.sha256(idx.numpy().tobytes()).hexdigest()[:16],
                  "weights": weights.hexdigest()[:16]}
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"trace-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _sample(self, sub: SearchSpace, rng: np.random.Generator, n: int) -> list[Arch]:
        res = int(rng.choice(sub.resolutions))
        if self.config.sandwich and n >= 2:
            others = sub.sample(rng, n=n - 2, resolution=res) if n > 2 else []
            return [sub.largest(res), sub.smallest(res)] + others
        return sub.sample(rng, n=n, resolution=res)

    def _checkpoint(self, phase_index: int, step: int, global_step: int,
                    opt: torch.optim.SGD | None, results: dict[str, Any], folder: Path | None = None) -> None:
        if self.rank == 0:
            state = {"phase_index": phase_index, "step_in_phase": step, "global_step": global_step,
                     "results": results, "config": self.config.to_dict(), "world_size": self.world,
                     "teacher_sha256": self._teacher_digest, "trainer_version": TRAINER_VERSION}
            save_checkpoint(folder or self.ckpt_dir, state, self.supernet.state_dict(),
                            self._optimizer_state(opt) if opt is not None else {})
        if self.world > 1:
            dist.barrier()

    def corner_archs(self, sub: SearchSpace) -> dict[str, Arch]:
        rng = np.random.default_rng(_seed(self.config.seed, 99))
        mid = sub.resolutions[len(sub.resolutions) // 2]
        return {"smallest": sub.smallest(), "largest": sub.largest(),
                "middle-1": sub.sample(rng, resolution=mid), "middle-2": sub.sample(rng, resolution=mid)}

    def evaluate_corners(self, sub: SearchSpace) -> dict[str, float]:
        """Validation accuracy of the corner subnets after BN re-calibration."""
        was = self.supernet.training
        out = {name: round(subnet_accuracy(self.supernet, arch, self.calib, self.val_set, self.spec,
                                           self.config.eval_batch_size, self.device), 2)
               for name, arch in self.corner_archs(sub).items()}
        self.supernet.train(was)
        return out

    def write_artifact(self, results: dict[str, Any]) -> Path:
        from ..artifact import write_artifact

        metrics = {"val_accuracy": results, "val_size": len(self.val_set), "train_size": len(self.train_set)}
        return write_artifact(self.out, self.supernet, self.spec, self.calib, self.config.to_dict(), metrics)


def train(config: TrainConfig, out: str | Path, resume: bool = False, only_phase: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Run progressive shrinking (all phases, or one) and write the artifact into ``out``."""
    return Trainer(config, out, progress).run(resume=resume, only_phase=only_phase)

