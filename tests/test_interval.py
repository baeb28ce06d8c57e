"""Predicted accuracy with an honest interval: calibration, the file, a search that does not reward
extrapolation, and the round trip through the service, the proto and the client."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import served_copy, until
from ofa.artifact import MEASUREMENTS, add_file, load_artifact
from ofa.predict.accuracy import AccuracyPredictor, PredictorError, arch_features, select_and_fit
from ofa.predict.interval import Interval, choice_distance
from ofa.search import Constraints, Scorer, SearchSettings, search
from ofa.search.load import load_scorer
from ofa.space import get_space, space_digest

SPACE = get_space("mbv3-small-images")


def _truth(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return 75 + x @ w


def test_choice_distance_counts_changed_choices():
    a, b = SPACE.largest(), SPACE.smallest()
    x = arch_features(SPACE, SPACE.encode([a, b]))
    assert choice_distance(x[:1], x[:1])[0] == 0
    # one block's kernel changed: one choice
    k = list(a.kernel)
    k[0] = SPACE.kernel_choices[0]
    one = arch_features(SPACE, SPACE.encode([replace(a, kernel=tuple(k))]))
    assert choice_distance(one, x[:1])[0] == 1
    assert choice_distance(x[1:], x[:1])[0] > 1


def test_the_interval_covers_held_out_measurements_at_its_level_and_widens_away_from_them():
    rng = np.random.default_rng(0)
    codes = SPACE.sample_codes(1, 600)
    x = arch_features(SPACE, codes)
    w = rng.normal(0, 0.25, x.shape[1])
    y = _truth(x, w) + rng.normal(0, 0.4, len(x))
    pred, _ = select_and_fit(x[:80], y[:80], space_digest(SPACE), ["ridge-3"])
    iv = pred.interval
    assert iv is not None and iv.level == 0.9 and iv.q > 0 and iv.info["calibration_subnets"] == 80
    b = pred.bounds_features(x[80:])
    covered = float(np.mean((b.low <= y[80:]) & (y[80:] <= b.high)))
    assert covered >= 0.85, covered  # nominal 0.9; 520 fresh subnets
    assert np.all(b.low <= b.prediction) and np.all(b.prediction <= b.high)
    near, far = np.argsort(b.distance)[:50], np.argsort(b.distance)[-50:]
    assert (b.high - b.low)[far].mean() > (b.high - b.low)[near].mean()


def test_the_interval_survives_the_file_and_a_file_without_one_still_reads():
    rng = np.random.default_rng(1)
    x = arch_features(SPACE, SPACE.sample_codes(2, 40))
    pred, _ = select_and_fit(x, 70 + rng.normal(0, 1, 40), space_digest(SPACE), ["ridge-3"])
    back = AccuracyPredictor.from_bytes(pred.to_bytes(), SPACE)
    assert back.interval.to_meta() == pred.interval.to_meta()
    assert np.array_equal(back.interval.anchors, pred.interval.anchors)
    b1, b2 = pred.bounds_features(x), back.bounds_features(x)
    assert np.allclose(b1.low, b2.low, atol=1e-4) and np.array_equal(b1.extrapolated, b2.extrapolated)
    bare = AccuracyPredictor.from_bytes(replace(pred, interval=None).to_bytes(), SPACE)
    assert bare.interval is None
    nb = bare.bounds_features(x)
    assert np.array_equal(nb.low, nb.prediction) and not nb.extrapolated.any()
    # a damaged interval is refused with the reason, not read as something else
    meta_bad = replace(pred, interval=replace(pred.interval, kappa=-1.0)).to_bytes()
    with pytest.raises(PredictorError, match="kappa"):
        AccuracyPredictor.from_bytes(meta_bad, SPACE)


def _extrapolating_predictor():
    """A linear predictor whose point optimum is every block at kernel 7 (+0.3 points each), while every
    measured subnet (its interval's anchors) had kernel 3 everywhere: each kernel-7 block gains 0.3 points
    of prediction and costs 0.5 of interval (q 0.5 per choice away, kappa 1)."""
    n_r, n_k = len(SPACE.resolutions), len(SPACE.kernel_choices)
    w = np.zeros((arch_features(SPACE, SPACE.sample_codes(0, 1)).shape[1], 1), np.float32)
    for slot in range(SPACE.num_slots):
        w[n_r + slot * n_k + SPACE.kernel_choices.index(7), 0] = 0.3
    codes = SPACE.sample_codes(3, 60)
    codes[:, : SPACE.num_slots] = SPACE.kernel_choices.index(3)
    anchors = arch_features(SPACE, codes)
    interval = Interval(0.9, 0.5, 1.0, 2.0, 75.0, (anchors > 0.5).astype(np.uint8))
    members = (((w, np.zeros(1, np.float32)),),)
    return AccuracyPredictor(space_digest(SPACE), "fixture", members, 75.0, {}, interval)


def test_the_search_does_not_prefer_a_pick_the_predictor_only_extrapolates_to():
    pred = _extrapolating_predictor()
    settings = SearchSettings(population=60, generations=120, seed=0)
    without = search(Scorer(SPACE, replace(pred, interval=None)), Constraints(), None, settings).best
    assert sum(k == 7 for k in without.arch.kernel) >= len(without.arch.kernel) - 1  # the point optimum
    assert without.accuracy_low is None and not without.extrapolated
    best = search(Scorer(SPACE, pred), Constraints(), None, settings).best
    assert all(k == 3 for k in best.arch.kernel), best.arch.kernel  # stays where it was measured
    assert best.measured_distance == 0 and not best.extrapolated
    assert best.accuracy_low <= best.accuracy <= best.accuracy_high
    # and the point optimum, scored with the interval, says it lies outside what was measured
    flagged = pred.bounds(SPACE, SPACE.encode([without.arch]))
    assert flagged.extrapolated[0] and flagged.prediction[0] > 75


@pytest.fixture(scope="module")
def interval_artifact(tiny_artifact, tmp_path_factory):
    """The tiny artifact with a synthetic table marked noisy and a predictor fitted (with its interval) on
    'measurements' of 40 subnets; one searched subnet is recorded as measured."""
    from ofa.artifact import ACCURACY_PREDICTOR, latency_file

    root = served_copy(tiny_artifact, tmp_path_factory.mktemp("interval") / "tiny", "noisy-cpu")
    art = load_artifact(root)
    codes = art.space.sample_codes(4, 40)
    x = arch_features(art.space, codes)
    y = 70 + x @ np.random.default_rng(4).normal(0, 0.3, x.shape[1])
    pred, _ = select_and_fit(x, y, space_digest(art.space), ["ridge-3"])
    from ofa.predict.shift import Shift

    pred = replace(pred, info={"test": {"kendall_tau": 0.5, "rmse": 1.0, "interval_coverage": 0.875,
                                        "interval_half_width": 1.25}, "train_samples": 40, "test_samples": 8},
                   shift=Shift(-1.0, 0.5, 0.9, {"subnets": 10}))  # predictions for the test distribution
    add_file(root, ACCURACY_PREDICTOR, pred.to_bytes())
    table = json.loads((root / latency_file("noisy-cpu")).read_text())
    table["timing"] = {"repeatability": {"trusted": False, "verdict": "the machine is too noisy: 6.6%"}}
    add_file(root, latency_file("noisy-cpu"), json.dumps(table))
    best = search(load_scorer(root), Constraints(max_latency_ms=2.0), "noisy-cpu", SearchSettings(seed=5)).best
    digest = load_artifact(root).digest
    add_file(root, MEASUREMENTS, json.dumps({"artifact": digest, "split": "validation", "val_images": 100,
                                              "subnets": {best.arch.id: {"arch": best.arch.to_dict(),
                                                                         "accuracy": 71.25}}}))
    return root, best


def test_interval_extrapolation_measured_accuracy_and_noise_reach_the_client(interval_artifact, tmp_path):
    from ofa_client import Client
    from ofa_server.main import ServeConfig, Server
    from ofa_server.registry import Registry

    root, expected = interval_artifact
    srv = Server(Registry([str(root)], str(tmp_path / "targets")), ServeConfig(port=0, max_searches=1)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            until(lambda: c.health() == "SERVING", what="SERVING")
            s = c.search("noisy-cpu", max_latency_ms=2.0, seed=5)
            assert s.id == expected.arch.id
            assert s.predicted_accuracy_low == pytest.approx(expected.accuracy_low, abs=1e-3)
            assert s.predicted_accuracy_high == pytest.approx(expected.accuracy_high, abs=1e-3)
            assert s.predicted_accuracy_low <= s.predicted_accuracy <= s.predicted_accuracy_high
            assert s.interval_level == pytest.approx(0.9) and s.extrapolated == expected.extrapolated
            assert s.measured_accuracy == 71.25 and s.measured_split == "validation" and s.measured_images == 100
            assert s.latency_noisy
            other = c.search("noisy-cpu", max_latency_ms=3.0, seed=1)
            assert other.id == expected.arch.id or other.measured_accuracy is None  # never a neighbour's value
            q = c.supernets()[0]["accuracy_predictor"]
            assert q["interval_level"] == pytest.approx(0.9) and q["interval_coverage"] == pytest.approx(0.875)
            assert q["test_shift"] == -1.0 and s.supernet_digest == load_artifact(root).digest
            t = c.targets()[0]
            assert t["noisy"] and "6.6%" in t["noise"]
            assert json.loads(json.dumps(s.to_dict()))["predicted_accuracy_low"] == s.predicted_accuracy_low
    finally:
        srv.stop(0)


def test_the_client_cli_prints_the_interval_and_the_flags(interval_artifact, tmp_path, capsys):
    from ofa_client.cli import main
    from ofa_server.main import ServeConfig, Server
    from ofa_server.registry import Registry

    root, _ = interval_artifact
    srv = Server(Registry([str(root)], str(tmp_path / "targets")), ServeConfig(port=0, max_searches=1)).start()
    try:
        assert main(["--address", f"127.0.0.1:{srv.port}", "search", "--target", "noisy-cpu",
                     "--max-latency-ms", "2.0", "--seed", "5"]) == 0
        out = capsys.readouterr().out
        assert "at 90%" in out and "measured 71.25% on 100 validation images" in out and "noisy" in out
    finally:
        srv.stop(0)


def test_the_shift_to_the_test_distribution_moves_predictions_and_widens_intervals_and_survives_the_file():
    from ofa.data import ImageSet, split_test
    from ofa.predict.shift import MIN_SUBNETS, Shift, estimate_shift

    rng = np.random.default_rng(7)
    hard = rng.random(4000) < 0.2  # images the subnets share as hard: what makes the error not shrink with subnets
    val = (rng.random((12, 4000)) < 0.9) & ~hard
    test = (rng.random((12, 3000)) < 0.88) & ~hard[:3000]
    shift = estimate_shift(val, test, eval_images=3000, level=0.9)
    assert shift.offset == pytest.approx(100 * (test.mean() - val.mean()), abs=1e-3) and shift.offset < 0
    info = shift.info
    assert info["subnets"] == 12 and info["eval_images"] == 3000 and len(info["gaps"]) == 12
    assert shift.sigma == pytest.approx(np.sqrt(info["standard_error"] ** 2 + info["spread"] ** 2
                                                + info["evaluation_noise"] ** 2), abs=1e-3)
    assert shift.half_width == pytest.approx(1.6449 * shift.sigma, rel=1e-3)
    assert estimate_shift(val[: MIN_SUBNETS - 1], test[: MIN_SUBNETS - 1], 3000, 0.9) is None
    with pytest.raises(ValueError, match="same subnets"):
        estimate_shift(val, test[:5], 3000, 0.9)
    # applied: every prediction moves by the offset, each interval combines both half-widths
    x = arch_features(SPACE, SPACE.sample_codes(2, 40))
    pred, _ = select_and_fit(x, 70 + rng.normal(0, 1, 40), space_digest(SPACE), ["ridge-3"])
    moved = replace(pred, shift=shift)
    b, b0 = moved.bounds_features(x), pred.bounds_features(x)
    assert np.allclose(b.prediction, b0.prediction + shift.offset)
    assert np.allclose((b.high - b.low) / 2, np.hypot((b0.high - b0.low) / 2, shift.half_width))
    assert np.array_equal(b.extrapolated, b0.extrapolated)  # judged against what was measured, on validation
    back = AccuracyPredictor.from_bytes(moved.to_bytes(), SPACE)
    assert back.shift == shift and AccuracyPredictor.from_bytes(pred.to_bytes(), SPACE).shift is None
    with pytest.raises(PredictorError, match="shift"):
        AccuracyPredictor.from_bytes(replace(pred, shift=Shift(float("nan"), 1.0, 0.9, {})).to_bytes(), SPACE)
    # the two halves of a test split: disjoint, complete, the same for a seed
    images = ImageSet(torch.zeros(11, 1, 2, 2, dtype=torch.uint8), torch.arange(11))
    a, e = split_test(images, 3)
    assert len(a) + len(e) == 11 and not set(a.labels.tolist()) & set(e.labels.tolist())
    assert split_test(images, 3)[0].labels.tolist() == a.labels.tolist()
