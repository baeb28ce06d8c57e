"""Progressive shrinking: the training loop of ``ofa train``.

Every random choice of a step (data order, subnets, resolution, augmentation,
dropout) is derived from ``(seed, phase, step)`` — and the rank, where ranks must
differ — so a run resumed from a checkpoint continues bit for bit on CPU (on CUDA,
non-deterministic kernels make it equal only up to float rounding), and every rank
of a ``torchrun`` job samples the same subnets without communicating. Checkpoints
and the teacher are read from the output folder by every rank: a multi-node job needs it on
shared storage.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from .._io import atomic_save_tensors, sha256_file
from .._torch import num_threads, seeded
from ..artifact import CHECKPOINTS, METRICS_LOG
from ..data import DataError, DataSpec, augment, calibration_choice, prepare_batch, split_validation, training_data
from ..evaluate import subnet_accuracy
from ..space import Arch, SearchSpace, get_space
from ..folder import FolderIndex, StepBatch
from ..subnet import load_subnet
from ..supernet import Supernet
from .checkpoint import TEACHER, momentum_buffers, restore_momentum, save_checkpoint
from .config import ConfigError, Phase, TrainConfig, check_config, phase_space, resolve_device
from .objective import Objective
from .resume import TRAINER_VERSION, Start, plan_start, snapshot_dir
from .schedule import lr_at, set_lr, sgd
from .transfer import init_from, load_source

__all__ = ["Trainer", "train"]

log = logging.getLogger(__name__)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclasses.dataclass
class _PhaseRun:
    """What the steps of one phase share."""

    index: int
    phase: Phase
    sub: SearchSpace
    total: int
    model: nn.Module
    opt: torch.optim.SGD
    teacher: nn.Module | None
    amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler
    stream: Any = None  # the steps' batches decoded ahead (streamed ImageFolder), else None


@dataclasses.dataclass
class _Window:
    """The steps since the last metrics line (or the resume): the next line averages over them."""

    start: float
    images: int = 0
    steps: int = 0
    loss: float = 0.0


class Trainer:
    """One run of progressive shrinking into ``out`` (checkpoints, metrics, artifact)."""

    def __init__(self, config: TrainConfig, out: str | Path, progress: bool = True) -> None:
        check_config(config)
        self.config, self.out, self.progress = config, Path(out), progress
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(config.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        # a source to start from is read (and its space checked) before the data
        self.source = load_source(config.init_from, get_space(config.space)) if config.init_from else None
        with num_threads(config.threads):
            self._load_data()
            with seeded(config.seed):  # the initial weights are the seed's
                supernet = Supernet(self.space)
            self.supernet = supernet.to(self.device).to(memory_format=torch.channels_last)
        self.ckpt_dir = self.out / CHECKPOINTS
        self.metrics_path = self.out / METRICS_LOG
        self.teacher: nn.Module | None = None
        self._teacher_digest: str | None = None

    # ---- set-up helpers ----------------------------------------------------
    def _load_data(self) -> None:
        config = self.config
        base = get_space(config.space)
        if self.world > 1 and self.rank != 0:
            dist.barrier()  # rank 0 prepares the dataset first (a download, where one is needed)
        full, self.spec = training_data(config.dataset, config.data_dir, config.data_mode, config.image_size,
                                        config.loader_workers)
        if self.world > 1 and self.rank == 0:
            dist.barrier()
        self.space = self._fit_space(base, self.spec, config.resolutions)
        self.train_set, self.val_set = split_validation(full, config.val_size, config.seed)
        if config.train_subset:
            self.train_set = self.train_set.subset(torch.arange(min(config.train_subset, len(self.train_set))))
        self.streams, self.unreadable = isinstance(full, FolderIndex), 0
        chosen = calibration_choice(len(self.train_set), config.calib_size, config.seed)
        if self.streams:  # what the run keeps is decoded (bounded by val_size and calib_size), the rest streams
            self.val_set = self.val_set.load(config.image_size)
            self.calib = self.train_set.subset(chosen).load(config.image_size).images.contiguous()
        else:
            self.calib = self.train_set.images[chosen].contiguous()
        self.steps_per_epoch = len(self.train_set) // (config.batch_size * self.world)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"batch_size {config.batch_size} x {self.world} processes exceeds the "
                              f"{len(self.train_set)} training images")

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

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            path = self.ckpt_dir / TEACHER
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
            atomic_save_tensors(state, self.ckpt_dir / TEACHER)
        if self.world > 1:
            dist.barrier()
        self._teacher_digest = sha256_file(self.ckpt_dir / TEACHER)
        self.teacher = None

    # ---- the run -------------------------------------------------------------
    def run(self, resume: bool = False, only_phase: str | None = None) -> dict[str, Any]:
        """Train the phases (all, or ``only_phase``; from the last checkpoint if ``resume``) and, after the
        last one, write the artifact. Returns each phase's corner accuracies."""
        phases = self.config.phases
        with num_threads(self.config.threads):
            start = self._start(resume, only_phase)
            global_step, results = start.global_step, start.results
            for pi in range(start.phase, start.stop):
                first = pi == start.phase
                global_step, results[phases[pi].name] = self._run_phase(
                    pi, phases[pi], start.step if first else 0, global_step, start.buffers if first else {}, results)
            if self.rank == 0 and start.stop == len(phases):
                self.write_artifact(results)
        if self.world > 1:
            dist.barrier()
        return results

    def _start(self, resume: bool, only_phase: str | None) -> Start:
        start, ckpt = plan_start(self.config, self.ckpt_dir, self.world, resume, only_phase)
        if ckpt is not None:
            self.supernet.load_state_dict(ckpt.model)
            self._teacher_digest = ckpt.state.get("teacher_sha256")
        elif self.source is not None:  # a fresh run from a supernet that exists
            record = init_from(self.supernet, self.source)
            log.info("init_from %s: %d tensors copied, %s fresh", record["source"], record["copied"], record["fresh"])
            self._log(record)
        return start

    def _run_phase(self, pi: int, phase: Phase, start: int, global_step: int,
                   buffers: dict[str, torch.Tensor], results: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        cfg = self.config
        run = self._begin_phase(pi, phase, start, buffers)
        sub, total = run.sub, run.total
        bar = tqdm(total=total, initial=start, desc=f"{phase.name:8s}", unit="step",
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        self.supernet.train()
        t_phase = time.perf_counter()
        window = _Window(t_phase)  # since the last metrics line (or the resume)
        for step in range(start, total):
            loss, images, lr = self._step(run, step)
            global_step += 1
            window.loss += loss
            window.images += images
            window.steps += 1
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                self._log_window(phase, step, total, lr, global_step, window, bar)
                window = _Window(time.perf_counter())
            if global_step % cfg.checkpoint_every == 0 and step + 1 < total:
                self._checkpoint(pi, step + 1, global_step, run.opt, results)
        bar.close()
        del run  # releases the DDP reducer's hooks before the next phase wraps the net again
        return global_step, self._end_phase(pi, phase, sub, total - start, global_step, t_phase, results)

    def _begin_phase(self, pi: int, phase: Phase, start: int, buffers: dict[str, torch.Tensor]) -> _PhaseRun:
        cfg = self.config
        sub = phase_space(self.space, phase)
        total = max(1, round(phase.epochs * self.steps_per_epoch))
        if phase.reorder and start == 0:
            self.supernet.reorder_channels()
        model: nn.Module = Objective(self.supernet, cfg.label_smoothing)
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = sgd(self.supernet, phase.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)
        restore_momentum(self.supernet, opt, buffers)
        use_teacher = phase.kd_ratio > 0 and not cfg.sandwich
        teacher = self._teacher() if use_teacher else None
        amp = self.device.type == "cuda" and cfg.amp
        amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
        return _PhaseRun(pi, phase, sub, total, model, opt, teacher, amp, amp_dtype, scaler,
                         self._stream(pi, sub, start, total) if self.streams else None)

    def _stream(self, pi: int, sub: SearchSpace, start: int, total: int):
        """The steps' images read ahead (streamed ImageFolder): at each step's resolution, seeded by their place."""
        def plan():
            for s in range(start, total):
                idx, archs = self._plan(pi, sub, s)
                yield StepBatch(s, idx.tolist(), archs[0].resolution,
                                [_seed(self.config.seed, pi, s, 3, self.rank, j) for j in range(len(idx))])
        return self.train_set.stream(plan())

    def _plan(self, pi: int, sub: SearchSpace, step: int) -> tuple[torch.Tensor, list[Arch]]:
        """A step's images (indices into the training split) and subnets: functions of (seed, phase, step, rank)."""
        cfg = self.config
        epoch, b = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(
            _seed(cfg.seed, pi, epoch)))[self.rank :: self.world]
        rng = np.random.default_rng(_seed(cfg.seed, pi, step, 1))
        return order[b * cfg.batch_size : (b + 1) * cfg.batch_size], self._sample(sub, rng,
                                                                                   cfg.phases[pi].subnets_per_step)

    def _step(self, run: _PhaseRun, step: int) -> tuple[float, int, float]:
        """One optimizer step; returns its loss per subnet, its number of images and its lr."""
        cfg, pi, phase = self.config, run.index, run.phase
        idx, archs = self._plan(pi, run.sub, step)
        with seeded(_seed(cfg.seed, pi, step, 2, self.rank), self.device):  # augmentation and dropout
            if run.stream is not None:
                planned, images, ok = next(run.stream)
                assert planned.step == step, (planned.step, step)
                if not ok.all():  # unreadable files: left out of this batch, counted
                    self.unreadable += int((~ok).sum())
                    log.warning("step %d: %d unreadable images skipped (%d so far; first: %s)", step,
                                int((~ok).sum()), self.unreadable, self.train_set.files[int(idx[~ok][0])])
                    idx = idx[ok]
                    if len(idx) == 0:
                        raise DataError(f"every image of step {step} was unreadable: check {self.train_set.root}")
            else:
                images = augment(self.train_set.images[idx], cfg.augment_padding, cfg.augment_flip)
            x = prepare_batch(images, archs[0].resolution, self.spec, self.device)
            y = self.train_set.labels[idx].to(self.device)
            if cfg.trace:
                self._trace(phase, step, archs, idx)
            lr = lr_at(phase, step, run.total, self.steps_per_epoch)
            set_lr(run.opt, lr)
            with torch.autocast(self.device.type, dtype=run.amp_dtype, enabled=run.amp):
                soft = None
                if run.teacher is not None:
                    with torch.no_grad():
                        soft = run.teacher(x)
                loss = run.model(x, y, archs, phase.kd_ratio, soft, cfg.sandwich)
            run.opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(run.opt)
            run.scaler.update()
        return loss.item() / len(archs), len(idx), lr  # the loss is logged per subnet, comparable across phases

    def _log_window(self, phase: Phase, step: int, total: int, lr: float, global_step: int, window: _Window,
                    bar: tqdm) -> None:
        dt = time.perf_counter() - window.start
        mean_loss = window.loss / window.steps
        if self.world > 1:  # every rank logs at the same steps: the mean over the global batch
            mean = torch.tensor([mean_loss], device=self.device)
            dist.all_reduce(mean)
            mean_loss = mean.item() / self.world
        record = {"phase": phase.name, "step": step + 1, "steps": total,
                  "epoch": round((step + 1) / self.steps_per_epoch, 3), "loss": mean_loss, "lr": lr,
                  "img_per_s": window.images * self.world / dt, "global_step": global_step}
        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}")
        self._log(record)

    def _end_phase(self, pi: int, phase: Phase, sub: SearchSpace, steps: int, global_step: int, t_phase: float,
                   results: dict[str, Any]) -> dict[str, Any]:
        """The teacher (after the full phase), the corners' accuracy, and the phase-end checkpoints."""
        if phase.name == "full":
            self._save_teacher()
        evaluate = self.config.evaluate_phases == "all" or pi == len(self.config.phases) - 1
        phase_results = self.evaluate_corners(sub) if self.rank == 0 and evaluate else {}
        self._log({"phase": phase.name, "event": "phase_end", "val_accuracy": phase_results,
                   "global_step": global_step, "seconds": round(time.perf_counter() - t_phase, 1),
                   "steps": steps})
        results = {**results, phase.name: phase_results}
        self._checkpoint(pi + 1, 0, global_step, None, results)
        self._checkpoint(pi + 1, 0, global_step, None, results, snapshot_dir(self.ckpt_dir, phase))
        return phase_results

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
                            momentum_buffers(self.supernet, opt) if opt is not None else {})
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

