import functools
import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import served_copy, synthetic_predictor, synthetic_table
from ofa.predict.cost import CostModel, count_macs_params
from ofa.predict.latency import LatencyPredictor, block_plan
from ofa.search import (Constraints, Infeasible, Scorer, SearchCancelled, SearchSettings, UnknownTarget,
                        pareto_front, search)
from ofa.space import get_space
from ofa.subnet import build_subnet

SPACE = get_space("mbv3-small-images")
FAST = SearchSettings(population=60, generations=60)


@pytest.fixture(scope="module")
def table():
    return synthetic_table(SPACE)


@pytest.fixture(scope="module")
def scorer(table):
    return Scorer(SPACE, synthetic_predictor(SPACE), {"synthetic-cpu": LatencyPredictor(SPACE, table)})


@functools.cache
def space_plan():
    return block_plan(SPACE)


def table_latency(table: dict, arch) -> float:
    """The table's sum over an arch's blocks, found through the block keys (not the search's arrays)."""
    _, fixed, slots = space_plan()
    total = sum(table["entries"][k] for k in fixed[arch.resolution])
    i = 0
    for s, d in enumerate(arch.depth):
        for j in range(d):
            ki, ei = SPACE.kernel_choices.index(arch.kernel[i]), SPACE.expand_choices.index(arch.expand[i])
            total += table["entries"][slots[(arch.resolution, s * SPACE.max_depth + j, ki, ei)]]
            i += 1
    return total


@pytest.mark.parametrize("constraints", [
    Constraints(max_latency_ms=2.0),
    Constraints(max_macs=8_000_000),
    Constraints(max_params=600_000),
    Constraints(resolutions=(24,)),
    Constraints(max_latency_ms=2.5, max_macs=9_000_000, max_params=700_000, resolutions=(28, 32)),
], ids=["latency", "macs", "params", "resolution", "all"])
def test_every_constraint_is_honoured(scorer, table, constraints):
    best = search(scorer, constraints, "synthetic-cpu", FAST).best
    net = build_subnet(SPACE, best.arch)
    macs, params = count_macs_params(net, (SPACE.in_channels, best.arch.resolution, best.arch.resolution))
    assert (best.macs, best.params) == (macs, params)
    assert best.latency_ms == pytest.approx(table_latency(table, best.arch), abs=1e-3)
    if constraints.max_latency_ms is not None:
        assert table_latency(table, best.arch) <= constraints.max_latency_ms
    if constraints.max_macs is not None:
        assert macs <= constraints.max_macs
    if constraints.max_params is not None:
        assert params <= constraints.max_params
    if constraints.resolutions:
        assert best.arch.resolution in constraints.resolutions


def test_search_beats_random_sampling_of_the_same_budget(scorer):
    bound = Constraints(max_macs=10_000_000)
    result = search(scorer, bound, settings=SearchSettings(population=50, generations=100))
    codes = SPACE.sample_codes(7, result.evaluated)
    ok = CostModel(SPACE).macs(codes) <= bound.max_macs
    assert result.best.accuracy >= scorer.predict_accuracy(codes[ok]).max()


def test_min_accuracy_minimises_latency(scorer):
    result = search(scorer, Constraints(min_accuracy=86.0), "synthetic-cpu", FAST)
    assert result.best.accuracy >= 86.0
    codes = SPACE.sample_codes(3, 3000)
    good = scorer.predict_accuracy(codes) >= 86.0
    assert result.best.latency_ms <= scorer.latency_of("synthetic-cpu")(codes[good]).min()


def refused_at_once(scorer, constraints, field):
    """The Infeasible a search raises for ``constraints``, checked to name ``field`` and to come before any generation."""
    calls = []
    with pytest.raises(Infeasible, match=f"{field} = .* below the smallest achievable") as e:
        search(scorer, constraints, "synthetic-cpu", should_stop=lambda: calls.append(1) or False)
    assert e.value.field == field and not calls  # refused before the first generation
    return e.value


@pytest.mark.parametrize("field,constraints", [
    ("max_macs", Constraints(max_macs=1000)),
    ("max_params", Constraints(max_params=10)),
    ("max_macs", Constraints(max_macs=4_000_000, resolutions=(32,))),
], ids=["macs", "params", "macs-at-one-resolution"])
def test_an_infeasible_cost_bound_errors_at_once_with_the_exact_minimum(scorer, field, constraints):
    error = refused_at_once(scorer, constraints, field)
    # the smallest arch at each allowed resolution has the smallest MACs and params there
    smallest = [SPACE.smallest(r) for r in constraints.resolutions or SPACE.resolutions]
    cost = CostModel(SPACE).arch_macs if field == "max_macs" else CostModel(SPACE).arch_params
    assert error.achievable == min(cost(a) for a in smallest)


def test_an_infeasible_latency_bound_errors_at_once_with_a_reachable_minimum(scorer, table):
    error = refused_at_once(scorer, Constraints(max_latency_ms=0.01), "max_latency_ms")
    # an arch that has it exists, and neither the smallest archs nor random ones are faster
    _, code = scorer.lower_bound("latency_ms", "synthetic-cpu", ())
    assert error.achievable == pytest.approx(table_latency(table, SPACE.decode(code[None])[0]), abs=1e-6)
    smallest = min(table_latency(table, SPACE.smallest(r)) for r in SPACE.resolutions)
    others = SPACE.sample(0, n=3000)
    assert 0 < error.achievable <= min(min(table_latency(table, a) for a in others), smallest + 1e-9)


def test_an_unreachable_accuracy_floor_stops_after_the_generations(scorer):
    with pytest.raises(Infeasible, match="min_accuracy = 150 is above the highest predicted accuracy") as e:
        search(scorer, Constraints(min_accuracy=150.0), settings=SearchSettings(population=20, generations=10))
    assert e.value.field == "min_accuracy" and e.value.achievable < 150


def test_same_seed_same_answer(scorer):
    c = Constraints(max_latency_ms=2.2)
    a = search(scorer, c, "synthetic-cpu", SearchSettings(population=40, generations=40, seed=5))
    b = search(scorer, c, "synthetic-cpu", SearchSettings(population=40, generations=40, seed=5))
    assert a.best == b.best and a.history == b.history


def test_cancellation_stops_the_search(scorer):
    calls = []
    with pytest.raises(SearchCancelled):
        search(scorer, Constraints(), settings=FAST, should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert len(calls) == 4


@pytest.mark.parametrize("target", ["synthetic-cpu", None])
def test_pareto_front_is_sorted_and_non_dominated(scorer, target):
    front = pareto_front(scorer, 6, target, settings=SearchSettings(population=40, generations=30))
    assert 2 <= len(front) <= 6
    metric = "latency_ms" if target else "macs"
    costs, accs = [getattr(c, metric) for c in front], [c.accuracy for c in front]
    assert costs == sorted(costs) and accs == sorted(accs)
    for c in front:  # nothing on the front is dominated by another point on it
        assert not any(getattr(o, metric) <= getattr(c, metric) and o.accuracy > c.accuracy for o in front)


@pytest.mark.parametrize("call,error,match", [
    (lambda sc: search(sc, Constraints(max_latency_ms=3), "phone"), UnknownTarget,
     "target 'phone' has no latency table.*synthetic-cpu"),
    (lambda sc: search(sc, Constraints(max_latency_ms=3)), ValueError, "max_latency_ms needs a target"),
    (lambda sc: search(sc, Constraints(resolutions=(20,))), ValueError,
     r"resolutions \[20\] are not in the space; allowed: \[24, 28, 32\]"),
    (lambda sc: search(sc, settings=SearchSettings(population=1)), ValueError, "population must be in 2..10000"),
    (lambda sc: pareto_front(sc, 0), ValueError, "k must be in 1..100"),
], ids=["unknown-target", "latency-bound-without-target", "resolution-not-in-space", "population-too-small",
        "pareto-k-zero"])
def test_bad_requests_name_the_field(scorer, call, error, match):
    with pytest.raises(error, match=match):
        call(scorer)


@pytest.fixture(scope="module")
def served(tiny_artifact, tmp_path_factory):
    """The tiny artifact with the synthetic predictor and latency table (read-only)."""
    return served_copy(tiny_artifact, tmp_path_factory.mktemp("search") / "served")


def search_args(root):
    return ["--artifact", str(root), "--target", "synthetic-cpu", "--generations", "30", "--population", "30"]


def test_search_command_prints_a_result_within_the_bound(served, capsys):
    from ofa.cli import main

    assert main(["search", *search_args(served), "--max-latency-ms", "2.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latency_ms"] <= 2.5 and out["search_seconds"] > 0 and len(out["id"]) == 16


def test_search_command_exits_3_on_an_infeasible_bound(served, capsys):
    from ofa.cli import main

    assert main(["search", *search_args(served), "--max-macs", "10"]) == 3
    assert "max_macs = 10 is below the smallest achievable" in capsys.readouterr().err


def test_search_command_exits_2_on_an_unknown_target(served, capsys):
    from ofa.cli import main

    assert main(["search", "--artifact", str(served), "--target", "nope", "--max-latency-ms", "1"]) == 2
    assert "target 'nope' has no latency table" in capsys.readouterr().err
    assert main(["search", "--artifact", str(served), "--target", "x" * 100_000]) == 2
    assert len(capsys.readouterr().err) < 2200  # what was given is said, not echoed whole


@pytest.mark.parametrize("flags, message", [
    (["--max-latency-ms", "nan"], r"--max-latency-ms must be a number in \(0, 1e\+06\], got nan"),  # was served
    (["--max-latency-ms", "inf"], "--max-latency-ms must be a number"),
    (["--max-latency-ms", "-1"], "--max-latency-ms must be a number"),  # was "infeasible" (exit 3)
    (["--max-macs", "-1"], "--max-macs must be a number"),
    (["--min-accuracy", "nan"], "--min-accuracy must be a finite number"),
    (["--seed", "-1"], r"--seed must be an integer in 0..2\*\*64-1"),
    (["--population", "0"], "--population must be in 2..10000"),
])
def test_search_command_names_a_bound_no_search_can_honour(served, flags, message, capsys):
    from ofa.cli import main

    assert main(["search", *search_args(served), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_pareto_command_prints_the_front_and_plots_it(served, tmp_path, capsys):
    from ofa.cli import main

    assert main(["pareto", *search_args(served), "-k", "4", "--plot", str(tmp_path / "front.png"), "--json"]) == 0
    front = json.loads(capsys.readouterr().out)["front"]
    assert len(front) >= 2 and (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"


def test_the_predictors_load_and_score_without_torch(served):
    code = ("import sys; from ofa.search.load import load_scorer; s = load_scorer(sys.argv[1]); "
            "assert s.accuracy is not None and 'synthetic-cpu' in s.latency; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(served)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"  # predictors are read and scored with numpy only


def test_the_search_workers_start_with_the_pool_ready_to_search(served):
    from ofa_server.searcher import SearchJob, SearchPool

    before = set(multiprocessing.active_children())
    pool = SearchPool(2, (str(served),), niceness=3)  # ofa serve --search-niceness 3
    try:
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2  # both started with the pool, not by the first searches
        for w in workers:  # below the server's threads by the niceness asked for
            nice = int(Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
            assert nice == os.nice(0) + 3
        result = pool.run(SearchJob(Constraints(), "synthetic-cpu", SearchSettings(generations=5)), str(served))
        assert result.best.latency_ms is not None
    finally:
        pool.close()
