"""Extraction time: our ``extract(supernet, arch)`` vs the reference's ``get_active_subnet``.

The same random archs of ``mbv3-imagenet`` for both, 2 threads, weights copied
(``preserve_weight=True``). PERF.md records the reference at ~89 ms per subnet.

    python benchmarks/extract.py [--archs 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import run_reference, summary
from ofa.space import get_space
from ofa.supernet import Supernet, extract


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    space = get_space("mbv3-imagenet")
    archs = space.sample(0, n=a.archs + 2)
    ref = run_reference("extract", archs=[space.arch_to_reference(x) for x in archs],
                        threads=a.threads)["times"][2:]
    net = Supernet(space).eval()
    ours = []
    for arch in archs:
        t = time.perf_counter()
        extract(net, arch)
        ours.append(time.perf_counter() - t)
    ours = ours[2:]
    print(f"extract a static subnet, mbv3-imagenet, {a.archs} random archs, {a.threads} threads")
    print(f"  reference get_active_subnet  {summary(ref)}")
    print(f"  ours extract                 {summary(ours)}")
    print(f"  speed-up (mean)              {statistics.fmean(ref) / statistics.fmean(ours):.2f}x")


if __name__ == "__main__":
    main()
