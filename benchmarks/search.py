"""Evolutionary search: ours vs the reference EvolutionFinder, side by side in one run (issue 5).

Both search the `mbv3-imagenet` space (resolutions 128..224 step 4) under the same
MACs bound with the same population and generations, and score archs with the SAME
accuracy predictor: a 3x400 MLP with seeded random weights (the reference's
AccuracyPredictor architecture), loaded into the reference's class and into ours. The
script first checks that both give equal predictions and equal MACs for 20 archs,
then times N seeds of each and compares the best predicted accuracy found. The seeds
alternate (a reference process for one seed, then ours), so drift of the machine hits
both alike, and each side gets one short untimed search first.

    python benchmarks/search.py [--seeds 5] [--population 100] [--generations 500] [--max-mmacs 400]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from common import fingerprint, run_reference
from ofa.predict.accuracy import AccuracyPredictor, feature_length
from ofa.predict.cost import CostModel
from ofa.search import Constraints, Scorer, SearchSettings, search
from ofa.space import get_space


def random_mlp(n_in: int, seed: int) -> dict[str, torch.Tensor]:
    """The reference AccuracyPredictor's state dict (3 hidden layers of 400, no output bias)."""
    g = torch.Generator().manual_seed(seed)
    state, dims = {}, [n_in, 400, 400, 400]
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        bound = 1 / a ** 0.5
        state[f"layers.{i}.0.weight"] = (torch.rand(b, a, generator=g) * 2 - 1) * bound
        state[f"layers.{i}.0.bias"] = (torch.rand(b, generator=g) * 2 - 1) * bound
    state["layers.3.weight"] = (torch.rand(1, 400, generator=g) * 2 - 1) / 20
    state["base_acc"] = torch.tensor([75.0])
    return state


def ours_from(state: dict[str, torch.Tensor], space_digest: str) -> AccuracyPredictor:
    layers = tuple((state[f"layers.{i}.0.weight"].numpy().T.copy(), state[f"layers.{i}.0.bias"].numpy().copy())
                   for i in range(3))
    last = (state["layers.3.weight"].numpy().T.copy(), np.zeros(1, np.float32))
    return AccuracyPredictor(space_digest, "mlp-3x400", (layers + (last,),), float(state["base_acc"][0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--population", type=int, default=100)
    p.add_argument("--generations", type=int, default=500)
    p.add_argument("--max-mmacs", type=float, default=400.0, help="the MACs bound, in millions")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    fingerprint()
    torch.set_num_threads(a.threads)
    space = get_space("mbv3-imagenet")
    state = random_mlp(feature_length(space), seed=0)
    ours = ours_from(state, "benchmark")
    scorer = Scorer(space, ours)
    cost = CostModel(space)
    check = space.sample(123, n=20)
    check_ref = [{"ks": r["ks"], "e": r["e"], "d": r["d"], "image_size": r["r"]}
                 for r in map(space.arch_to_reference, check)]
    seeds = list(range(a.seeds))

    settings = SearchSettings(population=a.population, generations=a.generations)
    bound = Constraints(max_macs=int(a.max_mmacs * 1e6))
    search(scorer, bound, settings=SearchSettings(population=a.population, generations=5))  # warm-up
    codes = space.encode(check)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "mlp.safetensors")
        save_file(state, weights)
        print(f"reference EvolutionFinder and ours: population {a.population}, {a.generations} generations, "
              f"{len(seeds)} seeds, alternating (the reference takes 40-95 s a seed on this machine)...", flush=True)
        for seed in seeds:
            ref = run_reference("search", weights=weights, resolutions=list(space.resolutions),
                                population=a.population, generations=a.generations, seeds=[seed], warmup=True,
                                constraint_mflops=a.max_mmacs, check_archs=check_ref, threads=a.threads)
            if seed == seeds[0]:
                acc_diff = np.abs(ours.predict(space, codes) - np.array(ref["check_accuracy"])).max()
                macs_diff = np.abs(cost.macs(codes) - np.array(ref["check_mflops"]) * 1e6).max()
                print(f"same predictor: max |accuracy difference| over 20 archs {acc_diff:.2e}; "
                      f"max |MACs difference| {macs_diff:.0f}")
            t = time.perf_counter()
            res = search(scorer, bound, settings=SearchSettings(**{**settings.__dict__, "seed": seed}))
            ours_s = time.perf_counter() - t
            (run,) = ref["runs"]
            r = run["arch"]
            ref_arch = space.arch_from_reference(r["ks"], r["e"], r["d"], r["image_size"])
            ref_macs = cost.arch_macs(ref_arch)
            rows.append((seed, run["seconds"], ours_s, run["accuracy"], res.best.accuracy, ref_macs, res.best.macs))

    print("\n| seed | reference s | ours s | speed-up | reference best acc | ours best acc | "
          "reference MMACs | ours MMACs |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, rs, os_, ra, oa, rm, om in rows:
        print(f"| {seed} | {rs:.1f} | {os_:.3f} | {rs / os_:.0f}× | {ra:.4f} | {oa:.4f} | {rm / 1e6:.1f} | {om / 1e6:.1f} |")
    ref_t, our_t = [r[1] for r in rows], [r[2] for r in rows]
    ref_a, our_a = [r[3] for r in rows], [r[4] for r in rows]
    print(f"\nmean time: reference {statistics.fmean(ref_t):.1f} s, ours {statistics.fmean(our_t):.3f} s "
          f"({statistics.fmean(ref_t) / statistics.fmean(our_t):.0f}× faster; goal >= 100× and < 1 s); "
          f"per-seed speed-up {min(r / o for r, o in zip(ref_t, our_t)):.0f}-{max(r / o for r, o in zip(ref_t, our_t)):.0f}×")
    print(f"mean best predicted accuracy: reference {statistics.fmean(ref_a):.4f}, ours {statistics.fmean(our_a):.4f} "
          f"(goal: ours >= reference) -> {'met' if statistics.fmean(our_a) >= statistics.fmean(ref_a) else 'NOT met'}")
    print(f"all constraints honoured: reference {all(r[5] <= bound.max_macs for r in rows)}, "
          f"ours {all(r[6] <= bound.max_macs for r in rows)}")


if __name__ == "__main__":
    main()
