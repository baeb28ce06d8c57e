"""Streaming ImageFolder training (issue 24): does the loader keep up, and does memory stay flat?

Writes Fashion-MNIST's training images as 64 px RGB JPEGs in ``train/CLASS/`` folders (1x: 6,000
images, 4x: 24,000, the same images repeated with other names), then measures, after the machine
fingerprint:

- the loader alone: images/s that ``FolderIndex.stream`` with 2 workers delivers (decode, random
  resized crop to 32 px, flip, colour jitter), against what one training step consumes at the same
  resolution and batch (images/s of forward+backward+SGD of a sampled subnet, 2 threads);
- peak memory of a short ``ofa train --set data_mode=stream`` run (the same 30 steps) on the 1x and
  the 4x folder: the main process's peak RSS, and the peak of the RSS summed over it and its loader
  workers (shared pages counted in each: an upper bound); and the in-memory mode on the 4x folder
  for contrast.

    python benchmarks/stream.py [--out DIR] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import fingerprint

BATCH, RES = 128, 32


def write_folder(root: Path, copies: int) -> Path:
    from PIL import Image

    from ofa.data import load_dataset

    ds, spec = load_dataset("fashion-mnist")
    for c in spec.class_names:
        (root / "train" / c.replace("/", "-")).mkdir(parents=True, exist_ok=True)
    for i in range(6000):
        img = Image.fromarray(ds.images[i, 0].numpy()).convert("RGB").resize((64, 64), Image.BILINEAR)
        c = spec.class_names[int(ds.labels[i])].replace("/", "-")
        for k in range(copies):
            img.save(root / "train" / c / f"{i:05d}-{k}.jpg", quality=90)
    return root


def loader_rate(root: Path, steps: int) -> float:
    from ofa.folder import StepBatch, open_folder

    index = open_folder(root / "train", workers=2)
    rng = np.random.default_rng(0)
    plan = [StepBatch(s, rng.integers(0, len(index), BATCH).tolist(), RES, list(range(s * BATCH, (s + 1) * BATCH)))
            for s in range(steps + 2)]
    it = index.stream(plan)
    next(it), next(it)  # workers started
    t = time.perf_counter()
    n = sum(len(x) for _, x, _ in it)
    return n / (time.perf_counter() - t)


def step_rate(steps: int) -> float:
    import dataclasses

    from ofa.space import get_space
    from ofa.supernet import Supernet

    torch.set_num_threads(2)
    space = dataclasses.replace(get_space("mbv3-small-images"), in_channels=3, name="bench@rgb")
    net = Supernet(space).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = torch.randn(BATCH, 3, RES, RES).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))
    times = []
    for s in range(steps + 3):
        arch = space.sample(rng, resolution=RES)
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x, arch), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return BATCH / float(np.median(times[3:]))


def train_memory(root: Path, out: Path, mode: str, steps: int) -> dict:
    """Peak RSS (MB) of a short training run: the main process, and it plus its workers summed."""
    n = len(list((root / "train").rglob("*.jpg")))
    epochs = steps * BATCH / (n - 500)
    sets = [f"data_dir={root}", "dataset=imagefolder", f"data_mode={mode}", "image_size=32", "val_size=500",
            "calib_size=200", f"batch_size={BATCH}", "threads=2", "loader_workers=2", "evaluate_phases=last",
            "checkpoint_every=100000", f"phases.full.epochs={epochs}"]
    sets += [f"phases.{p}.{k}=0.0001" for p in ("kernel", "depth-1", "depth-2", "expand-1", "expand-2")
             for k in ("epochs", "warmup_epochs")]
    cmd = [sys.executable, "-m", "ofa", "train", "--preset", "quick", "--out", str(out), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    main_peak = tree_peak = 0
    while proc.poll() is None:
        main, tree = _rss(proc.pid)
        main_peak, tree_peak = max(main_peak, main), max(tree_peak, tree)
        time.sleep(0.1)
    if proc.returncode:
        sys.exit(f"ofa train failed:\n{proc.stderr.read()[-3000:]}")
    return {"images": n, "mode": mode, "main_peak_mb": round(main_peak / 2**20), "tree_peak_mb": round(tree_peak / 2**20),
            "seconds": round(time.perf_counter() - t, 1)}


def _rss(pid: int) -> tuple[int, int]:
    def one(p: int) -> int:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            kids += [int(k) for k in open(f"/proc/{pid}/task/{task}/children").read().split()]
    except OSError:
        pass
    main = one(pid)
    return main, main + sum(one(k) for k in kids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="work folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    fig = {"fingerprint": fingerprint()}
    out = Path(a.out or tempfile.mkdtemp(prefix="stream-"))
    folders = {}
    for copies in (1, 4):
        root = out / f"x{copies}"
        if not (root / "train").exists():
            t = time.perf_counter()
            write_folder(root, copies)
            print(f"wrote {6000 * copies} JPEGs in {time.perf_counter() - t:.0f} s", flush=True)
        folders[copies] = root
    fig["loader_img_per_s"] = round(loader_rate(folders[4], a.steps))
    fig["train_step_img_per_s"] = round(step_rate(a.steps))
    print(f"loader, 2 workers, {RES} px: {fig['loader_img_per_s']} img/s; a training step consumes "
          f"{fig['train_step_img_per_s']} img/s (batch {BATCH}, 2 threads): the loader is "
          f"{fig['loader_img_per_s'] / fig['train_step_img_per_s']:.1f}x faster", flush=True)
    runs = [train_memory(folders[1], out / "run1", "stream", a.steps),
            train_memory(folders[4], out / "run4", "stream", a.steps),
            train_memory(folders[4], out / "run4m", "memory", a.steps)]
    for r in runs:
        print(f"ofa train, {r['mode']:6s}, {r['images']:6d} images: peak RSS main {r['main_peak_mb']} MB, with "
              f"workers {r['tree_peak_mb']} MB, {r['seconds']} s", flush=True)
    fig["runs"] = runs
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
