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

With --stored it measures nothing: it reads the subnets ``ofa predictors`` measured
(``accuracy/measurements.json`` keeps which images each got right) and the stored
predictor, takes the same held-out subnets (pass the --test-fraction used there), and
says where the predictor's τ is lost: pairs at different resolutions against pairs at
the same one, how far apart subnets of one resolution are against the measurement's
own noise, and the ceiling a larger validation split would give.

With --stored --test-split it also measures those held-out subnets on the dataset's
test split (images nothing was fitted or chosen on; served as usual), and scores the
same stored predictor against the test measurement, against validation and test pooled,
and against random subsets of the pooled images of growing size: the predictor stays
fixed, only the measurement's size changes, so this checks the modelled τ-vs-images
curve above against measurements. --test-cache FILE keeps those measurements. It also
scores what the search does with the predictor: under budgets of MACs and of each
latency target's predicted latency (deciles over the held-out subnets), the test
accuracy of the subnet the predictor ranks first, against the best test accuracy within
the budget, and the same for three other ways to choose: measure every candidate on
validation, take the costliest that fits, pick at random.

    python benchmarks/accuracy_noise.py --artifact runs/fashion [--subnets 60] [--json FILE]
    python benchmarks/accuracy_noise.py --artifact runs/fashion --stored [--test-fraction 0.3]
    python benchmarks/accuracy_noise.py --artifact runs/fashion --stored --test-fraction 0.3 --test-split
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ofa.artifact import load_artifact
from ofa.data import load_dataset
from ofa.evaluate import subnet_correct
from ofa.predict.accuracy import AccuracyPredictor, arch_features, kendall_tau, tau_ceiling
from ofa.artifact import MEASUREMENTS
from ofa.predict.measure import (held_out as _split, pack_correct, stratified_archs, unpack_correct,
                                 validation_set)
from ofa.search.load import load_scorer
from ofa.space import Arch


def stored(root: Path, test_fraction: float, test_split: bool = False, test_cache: str | None = None) -> dict:
    """Where the stored predictor's held-out τ goes, from the stored measurements alone."""
    art = load_artifact(root)
    if not (root / MEASUREMENTS).exists():
        raise SystemExit(f"{root / MEASUREMENTS} is missing: run `ofa predictors --artifact {root}` first")
    m = json.loads((root / MEASUREMENTS).read_text())
    ids, n_img = sorted(m["subnets"]), m["val_images"]
    held = _split(ids, test_fraction)
    ids = [i for i, h in zip(ids, held) if h]
    archs = [Arch.from_dict(m["subnets"][i]["arch"]) for i in ids]
    correct = np.stack([unpack_correct(m["subnets"][i]["correct"], n_img) for i in ids]).astype(np.float64)
    measured = 100 * correct.mean(1)
    pred = AccuracyPredictor.from_bytes((root / "accuracy_predictor.safetensors").read_bytes(), art.space)
    predicted = replace(pred, shift=None).predict_features(arch_features(art.space, art.space.encode(archs)))
    res = np.array([a.resolution for a in archs])
    i, j = np.triu_indices(len(ids), 1)
    same = res[i] == res[j]
    agree = np.sign(predicted[i] - predicted[j]) * np.sign(measured[i] - measured[j]) > 0
    d = correct[i] - correct[j]
    pair_se = 100 * d.std(1, ddof=1) / np.sqrt(n_img)  # a measured difference's own noise, in points
    out = {"held_out": len(ids), "images": n_img, "kendall_tau": kendall_tau(predicted, measured),
           "pairs_across_resolutions": int((~same).sum()), "pairs_within": int(same.sum()),
           "agree_across": float(agree[~same].mean()) if (~same).any() else None,
           "agree_within": float(agree[same].mean()) if same.any() else None,
           "pair_noise_points": float(np.median(pair_se[same])), "within_sd_points": {}}
    print(f"{len(ids)} held-out subnets (--test-fraction {test_fraction}), {n_img} validation images; "
          f"predictor τ {out['kendall_tau']:.3f}")
    print(f"  pairs at different resolutions: {out['pairs_across_resolutions']}, the predictor orders "
          f"{out['agree_across']:.1%} of them as measured; at the same resolution: {out['pairs_within']}, "
          f"{out['agree_within']:.1%}")
    for r in np.unique(res):
        sd = float(measured[res == r].std(ddof=1))
        true_sd = float(np.sqrt(max(0.0, sd ** 2 - out["pair_noise_points"] ** 2 / 2)))
        out["within_sd_points"][int(r)] = {"measured": sd, "true_estimate": true_sd}
        print(f"  {r} px: {(res == r).sum()} subnets, measured accuracy sd {sd:.2f} points; the measurement's "
              f"own noise is {out['pair_noise_points'] / np.sqrt(2):.2f} per subnet, so the true sd is about "
              f"{true_sd:.2f}")
    sizes = [n_img * k for k in (1, 2, 3, 4, 6, 8, 10)]
    out["ceiling"] = {n: tau_ceiling(correct, n) for n in sizes}
    print("  ceiling (τ a predictor of the true accuracies could expect) against a measurement of N images: "
          + ", ".join(f"{n}: {t:.3f}" for n, t in out["ceiling"].items()))
    grid = range(n_img, 20 * n_img + 1, n_img // 10 or 1)
    enough = next((n for n in grid if tau_ceiling(correct, n) >= 0.8), None)
    out["images_for_ceiling_0.8"] = enough
    print(f"  the ceiling reaches 0.8 at about {enough} images" if enough else
          "  the ceiling stays under 0.8 up to 20 times these images")

    # The ceiling takes each observed difference for a true one. A less generous estimate for
    # pairs of one resolution: true accuracies normal with the sd estimated above, so a true
    # difference D has variance 2 sd^2, and measurements X1 = D + e1, X2 = D + e2 with
    # independent paired noise of variance s1^2, s2^2 agree in sign with expectation
    # (2/pi) asin(corr(X1, X2)) (Sheppard); the truth itself is X2 with s2 = 0, which gives
    # (2/pi) atan(sqrt(2) sd / s1). Pairs across resolutions, whose differences are many
    # times their noise, keep the ceiling's terms (a product of two for two measurements).
    def modelled(n: int, n2: int | None = None) -> float:
        """τ a perfect predictor expects against an n-image measurement, or (n2) two measurements' τ."""
        def across(m: int | None) -> np.ndarray:
            if m is None:
                return np.ones(len(i))
            z = np.abs(d.mean(1)) / np.maximum(d.std(1, ddof=1) / np.sqrt(m), 1e-12)
            return np.array([math.erf(v / math.sqrt(2)) for v in z])  # 2 * Phi(z) - 1

        terms = across(n) * across(n2)
        var = [(out["pair_noise_points"] ** 2 * n_img / m if m else 0.0) for m in (n, n2)]
        for r, sds in out["within_sd_points"].items():
            pairs = same & (res[i] == r)
            true = 2 * sds["true_estimate"] ** 2  # variance of a true difference
            corr = true / max(math.sqrt((true + var[0]) * (true + var[1])), 1e-12)
            terms[pairs] = 2 * math.asin(min(1.0, corr)) / math.pi
        return float(terms.mean())

    out["modelled"] = {n: modelled(n) for n in sizes}
    print("  modelled τ of a predictor of the true accuracies (pairs within a resolution from their estimated "
          "true sd): " + ", ".join(f"{n}: {t:.3f}" for n, t in out["modelled"].items()))
    enough = next((n for n in grid if modelled(n) >= 0.8), None)
    out["images_for_modelled_0.8"] = enough
    print(f"  which reaches 0.8 at about {enough} images" if enough else
          "  which stays under 0.8 up to 20 times these images")
    if test_split:
        test = test_correct(art, ids, archs, test_cache)
        out["test_split"] = against_more_images(predicted, correct, test, modelled)
        out["test_split"]["test_vs_validation_modelled"] = modelled(n_img, test.shape[1])
        print(f"  the model above expects the two measurements' τ against each other to be "
              f"{out['test_split']['test_vs_validation_modelled']:.3f}")
        scorer, codes = load_scorer(root, verify=False), art.space.encode(archs)  # load_artifact verified the files
        costs = {"MACs": scorer.cost.macs(codes).astype(np.float64)}
        for target in sorted(scorer.latency):
            costs[f"predicted latency on {target}"] = scorer.latency[target](codes)
        out["test_split"]["choice_under_budget"] = {
            name: choice_under_budget(predicted, measured, 100 * test.mean(1), cost, name)
            for name, cost in costs.items()}
    return out


def test_correct(art, ids: list[str], archs: list[Arch], cache: str | None) -> np.ndarray:
    """(subnets, test images) correctness of ``archs`` on the test split, served as usual; cached by arch id."""
    training = art.manifest["training"]
    test, spec = load_dataset(training["dataset"], training.get("data_dir") or None, False,
                              training.get("image_size", 224))
    known = {}
    if cache and Path(cache).exists():
        try:
            kept = json.loads(Path(cache).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--test-cache {cache} is not a cache this script wrote ({e}); move it away") from None
        if isinstance(kept, dict) and kept.get("artifact") == art.digest and kept.get("images") == len(test):
            known = kept["subnets"]
        else:
            print(f"  --test-cache {cache} holds another artifact's or split's measurements: measuring anew")
    todo = [(i, arch) for i, arch in zip(ids, archs) if i not in known]
    t = time.perf_counter()
    for i, arch in tqdm(todo, desc="held-out subnets on the test split", unit="subnet"):
        known[i] = pack_correct(subnet_correct(art.supernet, arch, art.calibration, test, spec).numpy())
    if cache:
        Path(cache).write_text(json.dumps({"artifact": art.digest, "images": len(test), "subnets": known}))
    print(f"  {len(todo)} measured on the {len(test)}-image test split in {time.perf_counter() - t:.0f} s"
          + (f", {len(ids) - len(todo)} from {cache}" if len(todo) < len(ids) else ""))
    return np.stack([unpack_correct(known[i], len(test)) for i in ids]).astype(np.float64)


def against_more_images(predicted: np.ndarray, val: np.ndarray, test: np.ndarray, modelled) -> dict:
    """The fixed predictor's τ against measurements of growing size: test, pooled, random subsets."""
    pooled = np.concatenate([val, test], axis=1)
    out = {"validation_images": val.shape[1], "test_images": test.shape[1],
           "tau_validation": kendall_tau(predicted, 100 * val.mean(1)),
           "tau_test": kendall_tau(predicted, 100 * test.mean(1)),
           "tau_pooled": kendall_tau(predicted, 100 * pooled.mean(1)),
           "test_vs_validation_measured": kendall_tau(100 * val.mean(1), 100 * test.mean(1))}
    print(f"  the same predictor against the test split ({test.shape[1]} images): τ {out['tau_test']:.3f}; "
          f"against validation and test pooled ({pooled.shape[1]}): τ {out['tau_pooled']:.3f} "
          f"(validation alone: {out['tau_validation']:.3f}); the two measurements against each other: "
          f"τ {out['test_vs_validation_measured']:.3f}")
    rng = np.random.default_rng(0)
    n_all = pooled.shape[1]
    sizes = sorted({n for n in (n_all // 6, n_all // 3, n_all // 2, 2 * n_all // 3, 5 * n_all // 6, n_all)})
    out["curve"] = []
    for n in sizes:
        draws = [kendall_tau(predicted, pooled[:, rng.permutation(n_all)[:n]].mean(1))
                 for _ in range(1 if n == n_all else 30)]
        row = {"images": n, "tau_median": float(np.median(draws)), "tau_p10": float(np.percentile(draws, 10)),
               "tau_p90": float(np.percentile(draws, 90)), "modelled_perfect": modelled(n)}
        out["curve"].append(row)
        print(f"  {n:>6} pooled images (median of {len(draws)} random draws): predictor τ {row['tau_median']:.3f} "
              f"(10-90%: {row['tau_p10']:.3f}-{row['tau_p90']:.3f}); modelled for a perfect predictor "
              f"{row['modelled_perfect']:.3f}")
    return out


def choice_under_budget(predicted: np.ndarray, validation: np.ndarray, test: np.ndarray,
                        cost: np.ndarray, name: str) -> dict:
    """Points of test accuracy lost to the best subnet within each budget of ``cost``, per way of choosing.

    The test measurement is the judge: neither the predictor nor the validation choice saw
    it. Its own noise also lifts the best within a budget, so even a perfect choice loses
    some points here; choosing by the validation measurement shows that floor.
    """
    budgets = np.quantile(cost, np.linspace(0.1, 1.0, 10))
    ways = {"predictor": predicted, "validation": validation, "largest": cost}
    lost = {k: [] for k in (*ways, "random")}
    for b in budgets:
        fits = cost <= b
        best = test[fits].max()
        for k, score in ways.items():
            lost[k].append(float(best - test[fits][np.argmax(score[fits])]))
        lost["random"].append(float(best - test[fits].mean()))
    out = {"budgets": [float(b) for b in budgets], "candidates": [int((cost <= b).sum()) for b in budgets],
           "points_lost": lost, "mean_points_lost": {k: float(np.mean(v)) for k, v in lost.items()}}
    print(f"  choosing under a budget of {name} (10 budgets, its deciles over the held-out subnets, "
          f"{out['candidates'][0]}-{out['candidates'][-1]} candidates): test accuracy lost to the best within the "
          f"budget, mean over budgets")
    for k, way in (("predictor", "the predictor's first choice"), ("validation", "measure each on validation"),
                   ("largest", "the costliest that fits"), ("random", "at random (expected)")):
        print(f"    {way:<30} {out['mean_points_lost'][k]:.2f} points  ("
              + " ".join(f"{v:.2f}" for v in lost[k]) + ")")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--subnets", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--stored", action="store_true",
                   help="analyse what `ofa predictors` measured; measure nothing (but see --test-split)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="with --stored: as given to `ofa predictors`")
    p.add_argument("--test-split", action="store_true",
                   help="with --stored: also measure the held-out subnets on the test split (report only)")
    p.add_argument("--test-cache", help="with --test-split: JSON file that keeps those measurements")
    a = p.parse_args()
    if not 0 < a.test_fraction < 1:
        p.error(f"--test-fraction must be in (0, 1), got {a.test_fraction}")
    if a.test_split and not a.stored:
        p.error("--test-split needs --stored (it measures the held-out subnets `ofa predictors` kept)")
    if a.stored:
        torch.set_num_threads(a.threads)
        out = stored(Path(a.artifact), a.test_fraction, a.test_split, a.test_cache)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
        return
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
