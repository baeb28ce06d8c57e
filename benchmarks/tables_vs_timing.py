"""Latency tables of one machine against an independent timing pass: which predicts better (issue 36).

Times ``--subnets`` seeded random subnets (none of them profiled by the tables: they are excluded) end
to end by the protocol, in a fresh worker holding only these subnets, with the first table's runtime
and settings; then, for every ``--table``, its raw prediction (no recalibration) against those
timings: the share within ±10%, Spearman, and the median ratio (the table's level). Run it right
after the profiles, on a quiet machine, with the machine fingerprint.

    cd benchmarks && ../.venv/bin/python tables_vs_timing.py --space-file S.json --table a.json --table b.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import fingerprint
from ofa.jobs.profile import read_space_file
from ofa.predict.latency import LatencyPredictor, Speed
from ofa.predict.profile import timing_of_table
from ofa.predict.timing import spearman, subnet_part, time_parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space-file", required=True)
    p.add_argument("--table", action="append", required=True, help="a latency table (repeat)")
    p.add_argument("--subnets", type=int, default=50)
    p.add_argument("--seed", type=int, default=77)
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args()
    fp = fingerprint()
    space = read_space_file(a.space_file)
    tables = {Path(t).stem: json.loads(Path(t).read_text()) for t in a.table}
    profiled = {space.arch_from_json(json.dumps(r["arch"])).id for t in tables.values() for r in t["references"]}
    rng = np.random.default_rng([a.seed, 36])
    archs = []
    while len(archs) < a.subnets:
        arch = space.sample(rng)
        if arch.id not in profiled and arch.id not in {x.id for x in archs}:
            archs.append(arch)
    timing = timing_of_table(next(iter(tables.values())))
    timings = time_parts(space, [subnet_part(space, x) for x in archs], timing, desc="independent pass")
    measured = timings.ms
    out = {"fingerprint": fp, "subnets": len(archs), "backend": timing.backend, "threads": timing.threads,
           "repeatability": timings.repeatability()["verdict"], "tables": {}}
    codes = space.encode(archs)
    for name, table in tables.items():
        pred = LatencyPredictor(space, table).with_speed(Speed())(codes)
        rel = pred / measured
        out["tables"][name] = {"within_10pct": round(float(np.mean(np.abs(rel - 1) <= 0.10)), 4),
                               "spearman": round(spearman(pred, measured), 4),
                               "median_ratio": round(float(np.median(rel)), 4),
                               "mean_abs_rel_error": round(float(np.mean(np.abs(rel - 1))), 4)}
        t = out["tables"][name]
        print(f"{name:24s} {t['within_10pct']:.0%} within 10%, Spearman {t['spearman']:.3f}, median "
              f"predicted/measured {t['median_ratio']:.3f}, mean |error| {t['mean_abs_rel_error']:.1%}")
    print(f"{len(archs)} subnets timed by {timing.backend} ({out['repeatability']})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
