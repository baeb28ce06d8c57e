"""Extraction time: our ``extract(supernet, arch)`` vs the reference's ``get_active_subnet``.

The same random archs of ``mbv3-imagenet`` for both, 2 threads, weights copied
(``preserve_weight=True``), the first 2 archs untimed. Each side runs each round in a
fresh process, the rounds alternate, and each arch keeps its fastest round
(``../shared/PERF.md`` has the reference's single-run figures).

    python benchmarks/extract.py [--archs 30] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from common import fingerprint, run_reference, summary
from ofa.space import get_space
from ofa.supernet import Supernet, extract


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating repetitions (per-arch minimum kept)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one round of ours, JSON out
    a = p.parse_args()
    fingerprint()
    torch.set_num_threads(a.threads)
    space = get_space("mbv3-imagenet")
    archs = space.sample(0, n=a.archs + 2)
    if a.worker:
        net = Supernet(space).eval()
        times = []
        for arch in archs:
            t = time.perf_counter()
            extract(net, arch)
            times.append(time.perf_counter() - t)
        print(json.dumps(times))
        return

    def ours_round() -> list[float]:
        out = subprocess.run([sys.executable, __file__, "--worker", f"--archs={a.archs}", f"--threads={a.threads}"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"the worker failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    rounds = {"ref": [], "ours": []}
    for _ in range(a.rounds):
        rounds["ref"].append(run_reference("extract", archs=[space.arch_to_reference(x) for x in archs],
                                           threads=a.threads)["times"])
        rounds["ours"].append(ours_round())
    ref, ours = ([min(ts) for ts in zip(*rounds[k])][2:] for k in ("ref", "ours"))
    print(f"extract a static subnet, mbv3-imagenet, {a.archs} random archs, {a.threads} threads, "
          f"best of {a.rounds} alternating rounds, each in a fresh process")
    print(f"  reference get_active_subnet  {summary(ref)}")
    print(f"  ours extract                 {summary(ours)}")
    print(f"  speed-up (mean)              {statistics.fmean(ref) / statistics.fmean(ours):.2f}x")
    per_arch = [r / o for r, o in zip(ref, ours)]
    print(f"  per-arch speed-up            min {min(per_arch):.2f} median {statistics.median(per_arch):.2f} "
          f"max {max(per_arch):.2f}")


if __name__ == "__main__":
    main()
