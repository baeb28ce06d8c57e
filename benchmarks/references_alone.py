"""Are a target's references faster re-timed alone than among other networks (issue 33)? Cache warmth.

Times the table's reference subnets alone, then among ``--ballast`` seeded random subnets (as in a profile,
whose pass holds hundreds of networks), alternating ``--repeats`` times, each pass in a fresh worker by the
one protocol; prints the median of measured/profiled over the references for each pass. If the alone
passes were clearly faster, a re-timing of the references alone would bias the speed a client sends.

    cd benchmarks && ../.venv/bin/python references_alone.py --artifact A --target T [--ballast 80] [--json F]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import fingerprint, target_references
from ofa.predict.timing import subnet_part, time_parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--ballast", type=int, default=80)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    fp = fingerprint()
    space, refs, profiled, timing = target_references(a.artifact, a.target)
    rng = np.random.default_rng(a.seed)
    ballast = [space.sample(rng) for _ in range(a.ballast)]
    out: dict[str, list[float]] = {"alone": [], "among_ballast": []}
    for rep in range(a.repeats):
        for name, archs in (("alone", refs), ("among_ballast", refs + ballast)):
            t = time_parts(space, [subnet_part(space, x) for x in archs], timing)
            ratio = t.ms[: len(refs)] / profiled
            out[name].append(round(float(np.median(ratio)), 4))
            print(f"pass {rep + 1}, {name}: references measured/profiled, median {np.median(ratio):.3f} "
                  f"(range {ratio.min():.3f}-{ratio.max():.3f}); {t.repeatability()['verdict']}", flush=True)
    print(f"alone {np.mean(out['alone']):.3f} against among {a.ballast} others {np.mean(out['among_ballast']):.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"fingerprint": fp, "ballast": a.ballast, "passes": out}, indent=1))


if __name__ == "__main__":
    main()
