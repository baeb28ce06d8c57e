"""Test accuracy of subnets taken out of a trained supernet (issue 3's acceptance figures).

For the largest, the smallest and N seeded random subnets: extract, re-calibrate BN
on the artifact's calibration images, evaluate on the test split, no re-training.
Prints a table and the checks: largest >= 92%, smallest >= 89%, every random subnet
within 1.5 points of the largest (the `fashion` preset's goals).

    python benchmarks/subnet_accuracy.py --artifact runs/fashion [--random 20] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from ofa.artifact import load_artifact
from ofa.data import load_dataset
from ofa.evaluate import subnet_accuracy
from ofa.predict import CostModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--random", type=int, default=20)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    art = load_artifact(a.artifact)
    cfg = art.manifest["training"]
    test, spec = load_dataset(cfg["dataset"], a.data_dir or cfg["data_dir"] or None, train=False,
                              image_size=cfg["image_size"])
    space, cost = art.space, CostModel(art.space)
    archs = [("largest", space.largest()), ("smallest", space.smallest())]
    archs += [(f"random-{i}", arch) for i, arch in enumerate(space.sample(a.seed, n=a.random))]
    rows = []
    print(f"{'subnet':10s} {'res':>4s} {'MMACs':>7s} {'params':>9s} {'test acc':>8s}  arch")
    for name, arch in archs:
        t = time.perf_counter()
        acc = subnet_accuracy(art.supernet, arch, art.calibration, test, spec)
        rows.append({"name": name, "arch": arch.to_dict(), "id": arch.id, "test_accuracy": acc,
                     "macs": cost.arch_macs(arch), "params": cost.arch_params(arch),
                     "seconds": time.perf_counter() - t})
        print(f"{name:10s} {arch.resolution:4d} {rows[-1]['macs'] / 1e6:7.2f} {rows[-1]['params']:9,d} "
              f"{acc:7.2f}%  {arch}")
    largest, smallest = rows[0]["test_accuracy"], rows[1]["test_accuracy"]
    random_accs = [r["test_accuracy"] for r in rows[2:]]
    worst_gap = max((largest - x for x in random_accs), default=0.0)
    print(f"largest {largest:.2f}% (goal >= 92), smallest {smallest:.2f}% (goal >= 89)")
    if random_accs:
        print(f"random subnets: mean {sum(random_accs) / len(random_accs):.2f}%, min {min(random_accs):.2f}%, "
              f"largest gap to the largest {worst_gap:.2f} points (goal <= 1.5)")
    metrics = [json.loads(line) for line in open(f"{a.artifact}/metrics.jsonl")]
    print(f"training steps logged: {sum(1 for m in metrics if 'img_per_s' in m)}; "
          f"per-phase throughput (img/s, mean of logged windows):")
    for phase in dict.fromkeys(m["phase"] for m in metrics):
        rates = [m["img_per_s"] for m in metrics if m["phase"] == phase and "img_per_s" in m]
        if rates:
            print(f"  {phase:9s} {sum(rates) / len(rates):7.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "largest": largest, "smallest": smallest, "worst_gap": worst_gap}, f, indent=1)


if __name__ == "__main__":
    main()
