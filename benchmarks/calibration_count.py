"""How many calibration images does BN re-calibration need? (issue 4)

For N subnets spread over the space (stratified by MACs, corners included): validation
accuracy after re-calibrating BN on the first n of the artifact's calibration images,
for several n, against n = all stored (2000). Prints mean and max |difference| and the
calibration time per subnet; the smallest n whose mean difference stays within 0.1
points is the one to use.

    python benchmarks/calibration_count.py --artifact runs/fashion [--subnets 12]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ofa.artifact import load_artifact
from ofa.calibrate import calibrate_bn
from ofa.evaluate import accuracy
from ofa.predict.measure import stratified_archs, validation_set
from ofa.supernet import extract


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--subnets", type=int, default=12)
    p.add_argument("--counts", default="100,250,500,1000,2000")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    art = load_artifact(a.artifact)
    val, spec = validation_set(art.manifest["training"])
    counts = [min(int(c), len(art.calibration)) for c in a.counts.split(",")]
    full = len(art.calibration)
    archs = stratified_archs(art.space, a.subnets, seed=7)
    acc = np.zeros((len(archs), len(counts)))
    secs = np.zeros_like(acc)
    for i, arch in enumerate(archs):
        for j, n in enumerate(counts):
            sub = extract(art.supernet, arch).to(memory_format=torch.channels_last)
            t = time.perf_counter()
            calibrate_bn(sub, art.calibration[:n], spec, arch.resolution)
            secs[i, j] = time.perf_counter() - t
            acc[i, j] = accuracy(sub, val, spec, arch.resolution)
        print(f"subnet {i + 1}/{len(archs)} {arch.id}: " + "  ".join(f"{n}: {acc[i, j]:.2f}" for j, n in enumerate(counts)),
              flush=True)
    ref = acc[:, counts.index(full)] if full in counts else acc[:, -1]
    print(f"\n{len(archs)} subnets, validation set of {len(val)} images; difference to {full} calibration images:")
    print("| images | mean abs diff (points) | max abs diff | calibration s per subnet |\n|---|---|---|---|")
    chosen = None
    for j, n in enumerate(counts):
        d = np.abs(acc[:, j] - ref)
        print(f"| {n} | {d.mean():.3f} | {d.max():.2f} | {secs[:, j].mean():.3f} |")
        if chosen is None and d.mean() <= 0.1:
            chosen = n
    print(f"\nsmallest count within 0.1 points (mean): {chosen}")


if __name__ == "__main__":
    main()
