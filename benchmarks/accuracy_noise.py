"""How well can any accuracy predictor rank subnets against measured validation accuracy? (issue 4)

The accuracy predictor is scored by Kendall's τ against *measured* accuracies, and a
measurement on a finite validation split is itself noisy. This script measures that
noise on a trained artifact: for subnets chosen as ``ofa predictors`` chooses them
(stratified over MACs, corners included), each extracted and BN re-calibrated as
served, it keeps which validation images each one gets right, then reports

- split-half τ: accuracy on one random half of the images vs the other half (median
  over 20 splits): how well the measurement agrees with itself at half the size;
- the τ ceiling: for every pair of subnets, the chance that a measurement on another
  validation split of the same size orders the pair as this one does, from the pair's
  per-image differences (a normal approximation, paired, so shared mistakes cancel),
  turned into the τ a predictor that knew the true accuracies would expect.
  It uses the observed differences as the true ones, so it is an upper bound.

    python benchmarks/accuracy_noise.py --artifact runs/fashion [--subnets 60] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from tqdm import tqdm

from ofa.artifact import load_artifact
from ofa.evaluate import subnet_correct
from ofa.predict.accuracy import kendall_tau, tau_ceiling
from ofa.predict.measure import stratified_archs, validation_set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--subnets", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    art = load_artifact(a.artifact)
    val, spec = validation_set(art.manifest["training"])
    archs = stratified_archs(art.space, a.subnets, a.seed)
    t = time.perf_counter()
    correct = np.stack([subnet_correct(art.supernet, x, art.calibration, val, spec).numpy()
                        for x in tqdm(archs, desc="subnets", unit="subnet")])
    acc = 100 * correct.mean(1)
    print(f"{len(archs)} subnets of {art.space.name}, {correct.shape[1]} validation images, "
          f"{time.perf_counter() - t:.0f} s; accuracy {acc.min():.2f}-{acc.max():.2f}% "
          f"(middle 80%: {np.percentile(acc, 10):.2f}-{np.percentile(acc, 90):.2f})")
    rng = np.random.default_rng(a.seed)
    halves = []
    for _ in range(20):
        mask = np.zeros(correct.shape[1], bool)
        mask[rng.permutation(correct.shape[1])[: correct.shape[1] // 2]] = True
        halves.append(kendall_tau(correct[:, mask].mean(1), correct[:, ~mask].mean(1)))
    half = float(np.median(halves))
    ceiling = tau_ceiling(correct)
    print(f"  split-half Kendall τ ({correct.shape[1] // 2} vs {correct.shape[1] - correct.shape[1] // 2} "
          f"images): {half:.3f} (median of 20 splits)")
    print(f"  τ a predictor of the true accuracies would expect against a {correct.shape[1]}-image "
          f"measurement: at most {ceiling:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"archs": [x.to_dict() for x in archs], "accuracy": acc.tolist(), "split_half_tau": half,
                       "tau_ceiling": ceiling, "images": int(correct.shape[1])}, f, indent=1)


if __name__ == "__main__":
    main()
