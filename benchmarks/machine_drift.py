"""How steady this machine's speed is over minutes: the bound on any latency table's raw accuracy (issue 19).

Prints the machine fingerprint, then re-times the same ten reference subnets (those a table
keeps, ``ofa profile --recalibrate`` re-times) with the timing protocol every ``--every``
seconds for ``--minutes``. Each run's speed is the median of the references' ratios to the
first run's times (the statistic ``--recalibrate`` uses). A table profiled at one moment
and used at another is off by the ratio of the two moments' speeds, whatever its own
quality, so the share of pairs of moments at least ``--gap`` seconds apart whose speeds
agree within ±10% is an upper bound on "raw within ±10%" on this machine; the same share
after recalibrating at the later moment's start is what use-time recalibration can give.

    python benchmarks/machine_drift.py [--backend onnxruntime|torch] [--minutes 6] [--every 20]
        [--gap 60] [--load 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import busy_loops, fingerprint
from ofa.predict.profile import reference_archs
from ofa.predict.timing import Timing, subnet_part, time_parts
from ofa.space import get_space


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="mbv3-small-images")
    p.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--every", type=float, default=20.0, help="seconds from the start of one run to the next")
    p.add_argument("--gap", type=float, default=60.0, help="pairs of runs at least this far apart count")
    p.add_argument("--load", type=int, default=0, help="busy loops at nice 10 beside everything")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args()
    fp = fingerprint()
    space = get_space(a.space)
    parts = [subnet_part(space, r) for r in reference_archs(space)]
    timing = Timing(backend=a.backend)
    starts, ms = [], []
    t0 = time.perf_counter()
    with busy_loops(a.load):
        if a.load:
            print(f"under load: {a.load} busy loop(s) at nice 10")
        while time.perf_counter() - t0 < 60 * a.minutes:
            t = time.perf_counter()
            ms.append(time_parts(space, parts, timing).ms)
            starts.append(t - t0)
            speed = float(np.median(ms[-1] / ms[0]))
            print(f"  {starts[-1]:6.0f} s  speed x{speed:.3f} of the first run  (references "
                  f"{ms[-1].min():.3f}-{ms[-1].max():.3f} ms)", flush=True)
            time.sleep(max(0.0, a.every - (time.perf_counter() - t)))
    ms_a, starts_a = np.array(ms), np.array(starts)
    speeds = np.median(ms_a / ms_a[0], axis=1)
    rel = speeds / np.median(speeds)
    pairs = [(i, j) for i in range(len(ms)) for j in range(len(ms)) if starts_a[j] - starts_a[i] >= a.gap]
    ratio = np.array([np.median(ms_a[j] / ms_a[i]) for i, j in pairs])
    # per-subnet error after scaling by the median ratio: what recalibration leaves
    spread = np.array([np.mean(np.abs(ms_a[j] / ms_a[i] / np.median(ms_a[j] / ms_a[i]) - 1) <= 0.1)
                       for i, j in pairs])
    print(f"{len(ms)} runs of the {len(parts)} references over {starts_a[-1]:.0f} s, {a.backend}, "
          f"{timing.threads} threads")
    print(f"  speed relative to the median run: {rel.min():.3f}-{rel.max():.3f} (p10 {np.quantile(rel, 0.1):.3f}, "
          f"p90 {np.quantile(rel, 0.9):.3f}); runs within ±10% of the median: {np.mean(np.abs(rel - 1) <= 0.1):.0%}")
    if pairs:
        print(f"  {len(pairs)} pairs of runs >= {a.gap:.0f} s apart: speeds agree within ±10% in "
              f"{np.mean(np.abs(ratio - 1) <= 0.1):.0%} (the bound on raw within ±10%); ratio "
              f"{ratio.min():.3f}-{ratio.max():.3f}; after scaling by the median ratio, "
              f"{spread.mean():.0%} of the references within ±10%")
    if a.json:
        json.dump({"fingerprint": fp, "backend": a.backend, "load": a.load, "starts_s": starts_a.tolist(),
                   "ms": ms_a.tolist(), "speeds": speeds.tolist(),
                   "pairs_within_10pct": float(np.mean(np.abs(ratio - 1) <= 0.1)) if pairs else None},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
