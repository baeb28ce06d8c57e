"""How far apart do the two halves of the test split put one subnet's accuracy? (issue 33)

`ofa predictors` measures the validation-to-test shift on one seeded half of the test split and
`ofa report` checks served subnets on the other half (:func:`ofa.data.split_test`). Both halves
are samples of 5,000 images: even a predictor that knew every subnet's accuracy on the whole test
distribution would be off by their difference. This script takes the served files of repeated
demo runs (``demo_repeats.py``), keeps which of the 10,000 test images each one gets right, and

- for the split each run used (its training seed): the shift half's accuracy minus the evaluation
  half's, per served subnet: the share of the run's accuracy error that is the split's;
- over ``--splits`` other seeds: the spread of that difference, against sqrt(p(1-p)(1/n1 + 1/n2)),
  the binomial model the intervals use.

    python benchmarks/test_halves.py --runs ../runs/repeats-spread [--splits 2000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from common import fingerprint
from ofa.artifact import load_artifact
from ofa.data import ImageSet, load_dataset, split_test
from ofa.evaluate import correct_per_image
from ofa.export import FORMATS, RECORDED


def halves_of(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (shift, evaluation) image indices :func:`split_test` gives a test split of ``n`` images."""
    shift, evaluation = split_test(ImageSet(torch.zeros(n, 1), torch.arange(n)), seed)  # labels: the indices
    return shift.labels.numpy(), evaluation.labels.numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="a demo_repeats.py folder (seed-N/ per run)")
    p.add_argument("--splits", type=int, default=2000, help="other split seeds to draw the difference's spread")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(fingerprint(), flush=True)
    rows, spreads, splits = [], [], []
    for run in sorted(Path(args.runs).glob("seed-*/report.json")):
        report = json.loads(run.read_text())
        art = load_artifact(run.parent / "supernet")
        training = art.manifest["training"]
        test, spec = load_dataset(training["dataset"], training.get("data_dir") or None, False,
                                  training.get("image_size", 224))
        shift_idx, eval_idx = halves_of(len(test), training["seed"])
        for s in report["served"]:
            module = FORMATS[RECORDED].read((run.parent / s["files"][RECORDED]["file"]).read_bytes())
            hits = correct_per_image(module, test, spec, s["arch"]["resolution"]).numpy().astype(float)
            diff = 100 * (hits[shift_idx].mean() - hits[eval_idx].mean())
            p_ = hits.mean()
            model = 100 * np.sqrt(p_ * (1 - p_) * (1 / len(shift_idx) + 1 / len(eval_idx)))
            if len(splits) != args.splits:  # the same other seeds for every subnet
                splits = [halves_of(len(test), k) for k in range(1000, 1000 + args.splits)]
            others = [100 * (hits[a].mean() - hits[b].mean()) for a, b in splits]
            spreads.append(float(np.std(others)))
            rows.append({"run": run.parent.name, "label": s["label"], "id": s["id"],
                         "test_full": round(100 * p_, 3), "shift_half": round(100 * hits[shift_idx].mean(), 3),
                         "evaluation_half": round(100 * hits[eval_idx].mean(), 3), "halves_difference": round(diff, 3),
                         "reported_test": s["test_accuracy"], "predicted": s["predicted_accuracy"],
                         "error_vs_full_test": round(100 * p_ - s["predicted_accuracy"], 3),
                         "difference_sd_over_splits": round(spreads[-1], 3), "binomial_sd": round(model, 3)})
            r = rows[-1]
            print(f"{r['run']} {r['label']:6s} full {r['test_full']:.2f}  shift half {r['shift_half']:.2f}  evaluation "
                  f"half {r['evaluation_half']:.2f} (report {r['reported_test']:.2f})  difference {diff:+.2f}; over "
                  f"{args.splits} splits sd {spreads[-1]:.2f} (binomial {model:.2f}); predicted {r['predicted']:.2f}, "
                  f"full test {r['error_vs_full_test']:+.2f}", flush=True)
    d = np.array([r["halves_difference"] for r in rows])
    full = np.array([r["error_vs_full_test"] for r in rows])
    print(f"\n{len(rows)} served subnets: the halves' difference {d.min():+.2f} to {d.max():+.2f} "
          f"(mean {d.mean():+.2f}); "
          f"its sd over other splits {min(spreads):.2f}-{max(spreads):.2f}; prediction within 1 point of the full "
          f"10,000-image test split {int(np.sum(np.abs(full) <= 1))} of {len(full)} (errors {full.min():+.2f} to "
          f"{full.max():+.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"fingerprint": fingerprint(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
