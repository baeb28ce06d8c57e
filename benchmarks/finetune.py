"""Fine-tuning served subnets (issue 24): test accuracy before and after ``ofa finetune``, and wall time.

For three subnets of an artifact (the smallest, the median one: every choice the middle one, and
the largest, at its largest resolution), runs ``ofa finetune --epochs N`` on a copy of the artifact
(each in its own process, 2 threads) and prints the validation and test accuracy of the subnet as
served before (extracted, BN re-calibrated) and after (fine-tuned with distillation from the
largest subnet, BN re-calibrated), with the wall time of each, after the machine fingerprint.

    python benchmarks/finetune.py --artifact DIR [--epochs 1] [--work /tmp/ofa-finetune]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import fingerprint


def corner_archs(space) -> dict[str, object]:
    from ofa.space import Arch

    r = max(space.resolutions)
    mid = lambda c: c[len(c) // 2]  # noqa: E731
    depth = (mid(space.depth_choices),) * len(space.stages)  # kernel and expand: one value per active block
    median = Arch((mid(space.kernel_choices),) * sum(depth), (mid(space.expand_choices),) * sum(depth), depth, r)
    return {"smallest": space.smallest(r), "median": space.validate(median), "largest": space.largest(r)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--work", default="/tmp/ofa-finetune")
    args = p.parse_args()
    from ofa.artifact import open_artifact

    fp = fingerprint()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    art = work / "artifact"
    shutil.copytree(args.artifact, art)
    rows = {}
    for name, arch in corner_archs(open_artifact(art).space()).items():
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "ofa", "finetune", "--artifact", str(art), "--arch",
                              json.dumps(arch.to_dict()), "--epochs", str(args.epochs), "--threads", "2",
                              "--out", str(work / f"{name}.safetensors"), "--no-progress"],
                             check=True, capture_output=True, text=True)
        rows[name] = {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_seconds": time.perf_counter() - t0}
        print(f"{name}: done in {rows[name]['wall_seconds']:.0f} s", flush=True)
    print(f"\n| subnet | MMACs | val before → after | test before → after | wall time ({args.epochs} epoch(s)) |")
    print("|---|---|---|---|---|")
    from ofa.predict.cost import CostModel
    from ofa.space import Arch

    space = open_artifact(art).space()
    cost = CostModel(space)
    for name, r in rows.items():
        macs = cost.macs(space.encode([Arch.from_dict(r["arch"])]))[0] / 1e6
        print(f"| {name} `{r['id']}` | {macs:.2f} | {r['val_accuracy_before']:.2f} → {r['val_accuracy_after']:.2f}% | "
              f"{r['test_accuracy_before']:.2f} → {r['test_accuracy_after']:.2f}% | {r['wall_seconds']:.0f} s |")
    (work / "finetune.json").write_text(json.dumps({"fingerprint": fp, "epochs": args.epochs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
