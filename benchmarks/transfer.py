"""Transfer to new classes (issue 24): a supernet trained on Fashion-MNIST classes 0-4, transferred
to classes 5-9 with a fifth of their training images (``ofa train --init-from``, the ``transfer``
preset), against the same schedule from scratch on those images.

Writes the images as PNG ImageFolder trees (lossless: the pixels are Fashion-MNIST's, as RGB):
``source/`` (classes 0-4: every training image in train/, their test images in val/) and
``target/`` (classes 5-9: a seeded fifth of their training images in train/, every test image in
val/). Then, after the machine fingerprint:

1. ``ofa train --preset quick`` on source (2,000 held out for validation);
2. ``ofa train --preset transfer --init-from SOURCE`` on target;
3. ``ofa train --preset transfer`` on target from scratch, the same steps and schedule with the rate
   the quick preset uses from scratch (0.1; the transfer preset's 0.05 assumes trained weights);

and prints the test accuracy (target/val, 5,000 images) of the largest, the smallest and the median
subnet (every choice the middle one) of 2 and 3, each as served (BN re-calibrated), in one table,
with each run's training time (its phases, from its metrics log).

    python benchmarks/transfer.py [--work DIR] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import fingerprint

RES = (24, 28)


def write_trees(work: Path, seed: int = 0) -> None:
    from PIL import Image

    from ofa.data import load_dataset

    rng = np.random.default_rng(seed)
    for train in (True, False):
        ds, spec = load_dataset("fashion-mnist", None, train)
        labels = ds.labels.numpy()
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            if train and c >= 5:
                idx = np.sort(rng.choice(idx, len(idx) // 5, replace=False))
            folder = work / ("source" if c < 5 else "target") / ("train" if train else "val") / f"{c}-{spec.class_names[c].replace('/', '-')}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(ds.images[i, 0].numpy()).convert("RGB").save(folder / f"{i:05d}.png")


def train_seconds(out: Path) -> float:
    """The seconds the run's phases took (its metrics log), without loading the data."""
    from ofa.artifact import METRICS_LOG

    events = [json.loads(line) for line in (out / METRICS_LOG).read_text().splitlines()]
    return sum(e["seconds"] for e in events if e.get("event") == "phase_end")


def train(out: Path, data: Path, preset: str, sets: list[str], threads: int) -> None:
    """``ofa train`` into ``out`` (skipped when ``out`` holds a finished run)."""
    if (out / "manifest.json").exists():
        return
    cmd = [sys.executable, "-m", "ofa", "train", "--preset", preset, "--out", str(out), "--dataset", "imagefolder",
           "--data-dir", str(data), "--threads", str(threads), "--no-progress",
           "--set", "image_size=28", "--set", "resolutions=" + ",".join(map(str, RES))]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def corners(artifact: Path, data: Path) -> dict[str, float]:
    from ofa.artifact import load_artifact
    from ofa.calibrate import served_images
    from ofa.data import load_dataset
    from ofa.evaluate import subnet_accuracy
    from ofa.space import Arch

    art = load_artifact(artifact)
    test, _ = load_dataset("imagefolder", data, False, 28)
    sp = art.space
    mid = lambda choices: choices[len(choices) // 2]  # noqa: E731
    depth = (mid(sp.depth_choices),) * len(sp.stages)  # kernel and expand: one value per active block
    median = Arch((mid(sp.kernel_choices),) * sum(depth), (mid(sp.expand_choices),) * sum(depth), depth, max(RES))
    images = served_images(art)
    return {name: round(subnet_accuracy(art.supernet, sp.validate(a), images, test, art.data), 2)
            for name, a in (("largest", sp.largest(max(RES))), ("median", median), ("smallest", sp.smallest(max(RES))))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/ofa-transfer")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    fp = fingerprint()
    work = Path(args.work)
    if not (work / "target" / "val").exists():
        write_trees(work)
    counts = {s: sum(1 for _ in (work / s / "train").rglob("*.png")) for s in ("source", "target")}
    print(f"training images: source (classes 0-4) {counts['source']}, target (classes 5-9) {counts['target']}", flush=True)
    runs = work / "runs"
    train(runs / "source", work / "source", "quick", ["val_size=2000"], args.threads)
    train(runs / "transfer", work / "target", "transfer", [f"init_from={runs / 'source'}"], args.threads)
    train(runs / "scratch", work / "target", "transfer", ["phases.full.lr=0.1", "phases.elastic.lr=0.1"],
          args.threads)
    seconds = {run: round(train_seconds(runs / run), 1) for run in ("source", "transfer", "scratch")}
    rows = {run: corners(work / "runs" / run, work / "target") for run in ("transfer", "scratch")}
    print("\n| run (classes 5-9, a fifth of their images) | largest | median | smallest | training time |")
    print("|---|---|---|---|---|")
    for run, acc in rows.items():
        print(f"| {run} | {acc['largest']:.2f}% | {acc['median']:.2f}% | {acc['smallest']:.2f}% | "
              f"{seconds[run]:.0f} s |")
    print(f"(source supernet, classes 0-4, quick preset: {seconds['source']:.0f} s)")
    (work / "transfer.json").write_text(json.dumps({"fingerprint": fp, "images": counts, "seconds": seconds,
                                                    "test_accuracy": rows}, indent=1))


if __name__ == "__main__":
    main()
