"""Training throughput of the `cifar10` preset on CUDA with mixed precision (issue 3's GPU check).

Runs every phase of the `cifar10` preset (full, kernel, depth, expand; distillation and
several subnets per step as the preset sets them) for about --steps steps in all, with
autocast (bf16 where the GPU has it, else fp16 with loss scaling), and prints img/s per
phase from the run's metrics.jsonl, the GPU and its peak memory. Throughput does not
depend on pixel values: without --data-dir the script writes a CIFAR-10-shaped dataset
of seeded random images in torchvision's on-disk format into the output folder, so it
runs on a machine that cannot download anything.

    python benchmarks/cuda_train.py [--steps 300] [--data-dir DIR] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import fingerprint
from ofa.train import load_config, train

PHASES = ("full", "kernel", "depth-1", "depth-2", "expand-1", "expand-2")


def write_synthetic_cifar10(root: Path, seed: int = 0) -> Path:
    """50,000 + 10,000 seeded random 32x32 RGB images in torchvision's cifar-10-batches-py layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (10000, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 10000).tolist()}
        with open(folder / name, "wb") as f:  # torchvision reads this format with pickle
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps over all six phases")
    p.add_argument("--data-dir", help="a real CIFAR-10 (cifar-10-batches-py/ inside); default: synthetic")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", help="run folder (default: a temporary one)")
    a = p.parse_args()
    fingerprint()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; pass --device cpu to check the script on a CPU")
    out = Path(a.out or tempfile.mkdtemp(prefix="ofa-cuda-train-"))
    data = Path(a.data_dir) if a.data_dir else write_synthetic_cifar10(out / "data")
    if not a.data_dir:
        from torchvision.datasets import CIFAR10

        # torchvision checks each file's md5 against the real CIFAR-10; None skips the check
        CIFAR10.train_list = [[name, None] for name, _ in CIFAR10.train_list]
        CIFAR10.test_list = [[name, None] for name, _ in CIFAR10.test_list]
        CIFAR10.meta = {**CIFAR10.meta, "md5": None}
    base = load_config("cifar10", None, [f"data_dir={data}", f"device={a.device}"])
    steps_per_epoch = (50000 - base.val_size) // base.batch_size
    epochs = a.steps / len(PHASES) / steps_per_epoch
    cfg = load_config("cifar10", None, [f"data_dir={data}", f"device={a.device}", "amp=true", "log_every=10",
                                        "checkpoint_every=100000", "eval_batch_size=1000"]
                      + [f"phases.{ph}.epochs={epochs:.6f}" for ph in PHASES])
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg, out / "run", progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"cifar10 preset, {a.steps} steps in all, batch {cfg.batch_size}, "
          f"{'synthetic' if not a.data_dir else 'real'} data, device {a.device}"
          + (f" ({torch.cuda.get_device_name()}, autocast "
             f"{'bf16' if torch.cuda.is_bf16_supported() else 'fp16'})" if a.device.startswith("cuda") else ""))
    print("| phase | steps | subnets per step | img/s (mean of logged windows, first dropped) |\n|---|---|---|---|")
    for ph in cfg.phases:
        ips = [r["img_per_s"] for r in rows if r.get("phase") == ph.name and "img_per_s" in r]
        steps = max((r["step"] for r in rows if r.get("phase") == ph.name and "step" in r), default=0)
        warm = ips[1:] or ips
        print(f"| {ph.name} | {steps} | {ph.subnets_per_step} | {statistics.mean(warm):.0f} |" if warm
              else f"| {ph.name} | {steps} | {ph.subnets_per_step} | (no window logged) |")
    print(f"wall time {wall:.0f} s, corner evaluation and artifact included")
    if a.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
