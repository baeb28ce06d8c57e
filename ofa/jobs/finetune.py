"""Fine-tuning one served subnet with distillation from the supernet's largest subnet.

A subnet taken out of the supernet shares its weights with every other subnet; a few more
epochs on its own, distilling from the largest subnet at the same resolution (as the
supernet's shrinking phases do), buy back some of the accuracy sharing costs. The start is
the subnet as served (:func:`ofa.calibrate.served_subnet`), the teacher is served the same
way, the data is the training split the artifact's training used (rebuilt from the
manifest's ``training`` config, so the validation split stays held out), with the same
augmentation, label smoothing, SGD settings and a warm-up + cosine rate. At the end BN is
re-calibrated on the served images again, so the file is what the server's recipe would
serve: ``ofa finetune`` writes it in the served subnet format and records it in the artifact
(:func:`ofa.artifact.finetuned_file`), where ``ofa serve`` finds it.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .._torch import num_threads, seeded
from ..artifact import DATA, Artifact, add_file, finetuned_file, load_artifact, open_artifact
from ..calibrate import calibrate_bn, served_images, served_subnet
from ..data import DataSpec, ImageSet, augment, load_dataset, prepare_batch, split_validation
from ..evaluate import accuracy
from ..export import FORMATS, RECORDED, Served, subnet_metadata
from ..space import Arch
from ..train.objective import soft_cross_entropy
from ..train.schedule import set_lr, sgd, warmup_cosine

__all__ = ["DEFAULTS", "finetune", "record_finetuned", "training_split"]

log = logging.getLogger("ofa")

# lr for a batch of 128: a tenth of the quick preset's, the weights start trained; kd_ratio as the phases'
DEFAULTS: dict[str, Any] = {"lr": 0.01, "batch_size": 128, "kd_ratio": 1.0, "warmup_fraction": 0.1}


def _check(arch: Arch, art: Artifact, epochs: int, lr: float, batch_size: int, kd_ratio: float,
           data_dir: str | None) -> None:
    """Refuse values ``finetune`` cannot run with (ValueError naming the field), before any work."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in 0..1, got {kd_ratio!r}")
    art.space.validate(arch)
    training = art.manifest.get("training") or {}
    if training.get("imported_from") or "dataset" not in training:
        raise ValueError(f"artifact {art.path} was imported from a reference checkpoint (or records no training "
                         "config): its training split is unknown, so it cannot be fine-tuned here")
    if art.calibration is None:
        raise ValueError(f"artifact {art.path} has no calibration set: its subnets cannot be served")


def training_split(training: dict[str, Any], data_dir: str | None = None) -> tuple[ImageSet, ImageSet, DataSpec]:
    """(training images, validation split, spec) as the recorded training run split them (its
    ``train_subset`` too); ``data_dir`` overrides where the dataset is."""
    full, spec = load_dataset(training["dataset"], data_dir or training.get("data_dir") or None, True,
                              training.get("image_size", 224))
    train_set, val = split_validation(full, training["val_size"], training["seed"])
    if training.get("train_subset"):
        train_set = train_set.subset(torch.arange(min(training["train_subset"], len(train_set))))
    return train_set, val, spec


def _epoch(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, data: ImageSet, spec: DataSpec,
           arch: Arch, settings: dict[str, Any], first_step: int, bar) -> float:
    """One pass over ``data`` in a seeded order; returns the mean loss. ``settings``: the training config's
    augmentation, label smoothing, and this run's lr schedule, batch size, kd ratio and seed."""
    s = settings
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(s["seed"] * 1000 + first_step))
    losses = []
    student.train()
    for b, (images, labels) in enumerate(data.batches(s["batch_size"], order)):
        step = first_step + b
        set_lr(opt, warmup_cosine(s["lr"], step, s["total"], s["warmup"]))
        x = prepare_batch(augment(images, s["padding"], s["flip"]), arch.resolution, spec)
        with torch.no_grad():
            soft = F.softmax(teacher(x).float(), dim=1)
        logits = student(x)
        # as the supernet's objective combines them (ofa.train.objective): labels plus kd_ratio x teacher
        loss = F.cross_entropy(logits, labels, label_smoothing=s["label_smoothing"])
        if s["kd_ratio"] > 0:
            loss = loss + s["kd_ratio"] * soft_cross_entropy(logits, soft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
    return sum(losses) / max(1, len(losses))


def _accuracies(module: nn.Module, val: ImageSet, test: ImageSet, spec: DataSpec, resolution: int) -> dict[str, float]:
    return {"val": round(accuracy(module, val, spec, resolution), 3),
            "test": round(accuracy(module, test, spec, resolution), 3)}


def finetune(artifact_dir, arch: Arch, epochs: int, lr: float = DEFAULTS["lr"],
             batch_size: int = DEFAULTS["batch_size"], kd_ratio: float = DEFAULTS["kd_ratio"], seed: int = 0,
             threads: int | None = None, data_dir: str | None = None, progress: bool = True
             ) -> tuple[nn.Module, dict[str, Any]]:
    """``arch`` of the artifact at ``artifact_dir`` as served, trained ``epochs`` more epochs on the artifact's
    training split distilling from the largest subnet at its resolution, BN re-calibrated on the served images
    after; the module (eval mode, on the CPU) and a report (accuracies before and after on the validation
    and test splits, epochs, steps, seconds). Refuses an imported artifact (no training split recorded)."""
    art = load_artifact(artifact_dir)
    _check(arch, art, epochs, lr, batch_size, kd_ratio, data_dir)
    training = art.manifest["training"]
    t0 = time.perf_counter()
    with num_threads(threads), torch.inference_mode(False):
        train_set, val, spec = training_split(training, data_dir)
        test, _ = load_dataset(training["dataset"], data_dir or training.get("data_dir") or None, False,
                               training.get("image_size", 224))
        images = served_images(art)
        student = served_subnet(art.supernet, arch, images, art.data)
        before = _accuracies(student, val, test, spec, arch.resolution)
        teacher = served_subnet(art.supernet, art.space.largest(arch.resolution), images, art.data).eval()
        steps_per_epoch = -(-len(train_set) // batch_size)
        total = epochs * steps_per_epoch
        settings = {"seed": seed, "batch_size": batch_size, "lr": lr, "total": total, "kd_ratio": kd_ratio,
                    "warmup": int(DEFAULTS["warmup_fraction"] * steps_per_epoch),
                    "padding": training.get("augment_padding", 2), "flip": training.get("augment_flip", True),
                    "label_smoothing": training.get("label_smoothing", 0.0)}
        opt = sgd(student, lr, training.get("weight_decay", 0.0), training.get("momentum", 0.9),
                  training.get("nesterov", True))
        losses = []
        with seeded(seed), tqdm(total=total, desc=f"finetune {arch.id}", disable=not progress, unit="step") as bar:
            for e in range(epochs):
                losses.append(round(_epoch(student, teacher, opt, train_set, spec, arch, settings,
                                           e * steps_per_epoch, bar), 5))
                log.info("finetune %s: epoch %d/%d, loss %.4f", arch.id, e + 1, epochs, losses[-1])
        student = calibrate_bn(student, images, art.data, arch.resolution).eval()
        after = _accuracies(student, val, test, spec, arch.resolution)
    report = {"arch": arch.to_dict(), "id": arch.id, "supernet_digest": art.digest, "epochs": epochs,
              "steps": total, "seconds": round(time.perf_counter() - t0, 2), "lr": lr, "batch_size": batch_size,
              "kd_ratio": kd_ratio, "seed": seed, "train_images": len(train_set), "losses": losses,
              "calibration_images": len(images), "val_images": len(val), "test_images": len(test),
              "val_accuracy_before": before["val"], "val_accuracy_after": after["val"],
              "test_accuracy_before": before["test"], "test_accuracy_after": after["test"]}
    return student, report


def record_finetuned(artifact_dir, module: nn.Module, report: dict[str, Any]) -> bytes:
    """The served subnet file of a fine-tuned ``module`` (safetensors; its metadata a served subnet's with
    ``finetuned`` added: epochs, settings, accuracies before and after), recorded in the artifact as
    :func:`ofa.artifact.finetuned_file` (replacing an earlier one of the arch), so ``ofa serve`` serves it.
    Refused when the artifact's weights changed since ``report`` was made."""
    files = open_artifact(artifact_dir)
    if files.digest != report["supernet_digest"]:
        raise ValueError(f"artifact {artifact_dir} has other weights than the subnet was fine-tuned from "
                         f"(digest {files.digest[:12]}, not {report['supernet_digest'][:12]}): fine-tune again")
    arch = Arch.from_dict(report["arch"])
    keys = ("epochs", "steps", "lr", "batch_size", "kd_ratio", "seed", "val_accuracy_before", "val_accuracy_after",
            "test_accuracy_before", "test_accuracy_after")
    space = files.space()
    meta = subnet_metadata(arch, space, files.read_json(DATA), files.digest, report["calibration_images"],
                           finetuned={k: report[k] for k in keys})
    data = FORMATS[RECORDED].write(Served(module, arch, meta, space.in_channels))
    add_file(artifact_dir, finetuned_file(arch.id), data)
    return data
