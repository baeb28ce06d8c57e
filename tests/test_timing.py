"""The timing protocol: its statistic, its repeatability figures, its run-count rule and its worker."""
import dataclasses
import importlib
import os
from pathlib import Path

import numpy as np
import pytest

from ofa.predict.timing import (Part, Timing, TimingError, Timings, machine_speed, spearman, statistic,
                               time_parts)

FAST = Timing(backend="torch", threads=1, rounds=2, samples=1, sample_ms=0.5, warmup_ms=1.0)


def _samples(true_ms, speed_of_moment, rounds=6, samples=2, noise=0.0, seed=0):
    """Synthetic samples: each network's time, times the machine's speed at the moment it was timed."""
    rng = np.random.default_rng(seed)
    n = len(true_ms)
    orders = np.array([rng.permutation(n) for _ in range(rounds)])
    out = np.zeros((n, rounds, samples))
    for r in range(rounds):
        for k, i in enumerate(orders[r]):
            moment = (r * n + k) / (rounds * n)
            out[i, r] = true_ms[i] * speed_of_moment(moment) * (1 + noise * rng.standard_normal(samples))
    return out, orders


def test_the_statistic_divides_out_the_machine_changing_speed():
    true = np.linspace(0.5, 1.5, 40)
    # the machine runs 1.7x slower for the middle third of the run, as measured on a shared VM
    samples, orders = _samples(true, lambda t: 1.7 if 1 / 3 <= t < 2 / 3 else 1.0)
    figures = statistic(samples, orders)
    ratios = figures / true
    assert np.ptp(ratios) / ratios.mean() < 0.01  # every network at the same speed: their ratios are kept
    assert np.array_equal(np.argsort(figures), np.argsort(true))
    speed = machine_speed(samples, orders)
    assert speed.max() / speed.min() == pytest.approx(1.7, rel=0.05)


def test_the_statistic_keeps_the_sample_another_process_spared():
    true = np.linspace(0.5, 1.5, 40)
    samples, orders = _samples(true, lambda t: 1.0)
    # another process on the cores preempts a third of the samples, each 1.5-3x slower
    rng = np.random.default_rng(2)
    hit = rng.random(samples.shape) < 1 / 3
    loaded = samples * np.where(hit, rng.uniform(1.5, 3.0, samples.shape), 1.0)
    figures = statistic(loaded, orders)
    # a network is only off when both samples of most of its passes were preempted (1 in 9 per pass)
    assert np.mean(np.abs(figures / true - 1) < 0.01) >= 0.95 and spearman(figures, true) > 0.99
    plain = np.median(loaded.reshape(len(true), -1), axis=1)  # all samples alike: the preempted ones count
    assert np.mean(np.abs(plain / true - 1) < 0.01) < 0.8 and spearman(plain, true) < spearman(figures, true)


def test_repeatability_tells_noise_from_drift():
    true = np.linspace(0.5, 1.5, 40)
    # a machine 30% slower in the odd rounds: a drift, not noise, so the figures are still trusted
    samples, orders = _samples(true, lambda t: 1.3 if int(t * 6) % 2 else 1.0)
    rep = Timings(samples, (1,) * 40, 1.0, orders).repeatability()
    assert rep["trusted"] and rep["halves_drift"] == pytest.approx(1 / 1.3, rel=0.02) and rep["scatter"] < 0.01
    noisy, orders = _samples(true, lambda t: 1.0, noise=0.3, seed=1)
    rep = Timings(noisy, (1,) * 40, 1.0, orders).repeatability()
    assert not rep["trusted"] and "too noisy to trust" in rep["verdict"] and rep["scatter"] > 0.05


class _Clock:
    """A fake clock: each call of a fake network advances it by that network's cost."""

    def __init__(self):
        self.ns = 0

    def perf_counter_ns(self):
        return self.ns

    def perf_counter(self):
        return self.ns / 1e9

    def network(self, ms):
        def run():
            self.ns += int(ms * 1e6)
        return run


def test_the_run_count_rule_gives_short_networks_many_calls(monkeypatch):
    timer = importlib.import_module("ofa_client._timer")
    clock = _Clock()
    monkeypatch.setattr(timer, "time", clock)
    fast, slow = clock.network(0.02), clock.network(4.0)
    assert timer._calls_per_sample(fast, sample_ms=10, warmup_ms=5) == 500
    assert timer._calls_per_sample(slow, sample_ms=10, warmup_ms=5) == 3
    assert timer._calls_per_sample(clock.network(50.0), sample_ms=10, warmup_ms=5) == 1
    job = {"rounds": 3, "samples": 2, "sample_ms": 10, "warmup_ms": 5, "seed": 0}
    result = timer._time(job, [fast, slow], lambda msg: None)
    assert result["calls"] == [500, 3]
    assert np.allclose(np.array(result["times_ms"])[0], 0.02) and np.allclose(np.array(result["times_ms"])[1], 4.0)
    assert sorted(result["orders"][0]) == [0, 1] and len(result["orders"]) == 3


def test_the_worker_times_real_networks_in_its_own_process(tmp_path):
    from ofa.export import run_format, subnet_metadata, write_safetensors
    from ofa.space import get_space
    from ofa.subnet import module_of

    space = get_space("mbv3-small-images")
    arch = space.smallest(24)
    subnet = Part("subnet", (1, 24, 24), arch)
    assert run_format("torch") == "safetensors"  # a served file, in the format the torch backend runs: a report's
    served = tmp_path / "served.safetensors"
    served.write_bytes(write_safetensors(module_of(space, subnet.to_dict()), subnet_metadata(arch, space, {}, "0", 0)))
    timings = time_parts(space, [Part("stem", (1, 24, 24)), subnet, Part("file", (1, 24, 24), file=str(served))],
                         FAST)
    assert timings.samples_ms.shape == (3, 2, 1) and np.all(timings.samples_ms > 0)
    assert timings.calls[0] >= timings.calls[1] >= 1  # the stem alone is the cheaper network
    assert timings.orders.shape == (2, 3) and np.all(timings.ms > 0)


@pytest.mark.parametrize("change, message", [
    ({"backend": "tflite"}, "backend must be one of"),
    ({"backend": "onnxruntime", "channels_last": True}, "channels_last applies to the torch backend only"),
    ({"threads": 0}, "threads must be an integer >= 1"),
    ({"rounds": 1}, "rounds must be an integer >= 2"),
    ({"sample_ms": 0}, "sample_ms must be > 0"),
    ({"precision": "int4"}, "precision must be one of"),
    ({"backend": "torch", "precision": "int8"}, "no format runs in .torch. at .int8."),
], ids=["backend", "channels-last", "threads", "rounds", "sample-ms", "precision", "int8-torch"])
def test_bad_timing_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        FAST.replace(**change).check()


def test_a_failing_worker_says_why():
    with pytest.raises(TimingError, match="the timing worker exited"):
        time_parts(None, [Part("file", (1, 8, 8), file="/nonexistent/net.safetensors")], FAST)


@pytest.mark.parametrize("levels, passes", [((1.0, 1.03), 2), ((1.0, 1.2, 1.05), 3), ((1.0, None), 1)],
                         ids=["agree", "third-decides", "noisy-second-left-out"])
def test_a_speed_is_timed_in_passes_that_agree_on_the_machines_level(monkeypatch, levels, passes):
    """One pass's level moves between worker processes: two passes, and a third where they differ by > 5%;
    the joined run takes the machine at its median speed over all their rounds. Only the first pass gates: a
    later one its own check calls noisy is left out."""
    from ofa.predict import timing as timing_module

    base = np.array([1.0, 2.0, 3.0])
    made = iter(levels)

    def one_pass(*args, **kwargs):
        level = next(made)
        per_round = np.ones((3, 4)) if level is not None else np.array([[1, 1.3] * 2, [1, 0.8] * 2, [1, 1.1] * 2])
        samples = ((base * (level or 1.0))[:, None] * per_round)[:, :, None].repeat(2, axis=2)
        return Timings(samples, (10, 10, 10), 1.0, np.tile(np.arange(3), (4, 1)))

    said = []
    monkeypatch.setattr(timing_module, "time_parts_trusted", one_pass)
    monkeypatch.setattr(timing_module, "time_parts", one_pass)
    joined = timing_module.time_parts_agreed(None, [], Timing(), say=said.append)
    kept = [x for x in levels if x is not None]
    assert joined.samples_ms.shape == (3, 4 * passes, 2) and joined.seconds == passes
    assert np.allclose(joined.ms / base, np.median(kept), rtol=0.03)
    assert len(said) == (passes != 2) and next(made, None) is None


def test_a_network_exported_here_is_the_one_a_worker_exports(tmp_path, caplog, monkeypatch):
    """Up to IN_PROCESS_EXPORTS fp32 networks are exported in the calling process (a worker's start, torch's
    import, was most of its time), more in worker processes: the same bytes either way. int8 is quantized in
    workers only; onnxruntime's advice to pre-process, which the served int8 file skips on purpose, is kept
    out of the log of a process that quantizes (a server's), and NNCF sends no usage telemetry from it."""
    import hashlib
    import logging

    from test_latency import TINY

    from ofa.export import FORMATS
    from ofa.predict import timing as timing_module

    timing = Timing(backend="onnxruntime")
    parts = [timing_module.subnet_part(TINY, a) for a in (TINY.smallest(12), TINY.largest(16))]
    digests = []
    for k, in_process in enumerate((0, timing_module.IN_PROCESS_EXPORTS)):
        (tmp_path / str(k)).mkdir()
        items = timing_module._worker_items(TINY, parts, timing, tmp_path / str(k), False, in_process=in_process)
        digests.append([hashlib.sha256(Path(i["file"]).read_bytes()).hexdigest() for i in items])
    assert digests[0] == digests[1] and len(set(digests[0])) == 2
    fp32 = (tmp_path / "1" / Path(items[0]["file"]).name).read_bytes()
    with caplog.at_level(logging.WARNING):
        int8 = FORMATS["onnx_int8"].quantize(fp32, [np.random.default_rng(0).standard_normal((1, 1, 12, 12))])
    assert int8 != fp32 and "pre-processing" not in caplog.text
    pytest.importorskip("nncf")
    from nncf.definitions import NNCF_CI_ENV_VAR_NAME

    monkeypatch.delenv("NNCF_CI", raising=False)  # what NNCF reads when first imported: set, no telemetry
    assert FORMATS["openvino_int8"].quantize(fp32, [np.ones((1, 1, 12, 12))]) != fp32
    assert NNCF_CI_ENV_VAR_NAME == "NNCF_CI" and os.environ["NNCF_CI"] == "1"


def test_an_export_here_that_fails_is_a_timing_error(tmp_path):
    """An export in the calling process that cannot write its file (its folder is gone) fails as a worker's
    would: a TimingError that names the cause, not a traceback."""
    from test_latency import TINY

    from ofa.predict import timing as timing_module

    part = timing_module.subnet_part(TINY, TINY.smallest(12))
    with pytest.raises(TimingError, match="export to onnx failed: FileNotFoundError"):
        timing_module._worker_items(TINY, [part], Timing(backend="onnxruntime"), tmp_path / "gone", False)
    assert not (tmp_path / "gone").exists()


def test_networks_are_exported_once_for_every_pass_and_run_that_times_them(tmp_path, monkeypatch):
    """An export folder (the passes of a re-timing, a report's two timings): a network exported before is timed
    from its file, wherever it stands in the parts; a half-written export (a killed worker's) is never used."""
    from test_latency import TINY

    from ofa.predict import timing as timing_module

    exported = []
    real = timing_module._export_all

    def counting(space, exports, *rest):
        exported.extend(x[2] for x in exports)
        return real(space, exports, *rest)

    monkeypatch.setattr(timing_module, "_export_all", counting)
    timing = Timing(backend="onnxruntime", threads=1, rounds=2, samples=1, sample_ms=0.5, warmup_ms=1.0)
    a, b, c = (timing_module.subnet_part(TINY, x) for x in (TINY.smallest(12), TINY.largest(16), TINY.sample(3)))
    keep = tmp_path / "exports"
    keep.mkdir()
    first = time_parts(TINY, [a, b], timing, exported=keep)
    assert len(exported) == 2 and first.ms.shape == (2,)
    assert sorted(p.name for p in keep.iterdir()) == sorted(Path(f).name for f in exported)
    name_a = Path(exported[0]).name
    (keep / name_a).rename(keep / (name_a + ".part"))  # a worker killed while writing it
    items = timing_module._worker_items(TINY, [c, b, a], timing, tmp_path, False, keep)
    assert len(exported) == 4 and Path(exported[3]).name == name_a  # c and a exported; b found
    assert [Path(i["file"]).name for i in items[1:]] == [Path(exported[1]).name, name_a]
    # another seed is another network (its weights): never taken for this one
    other, _ = timing_module._export_name(TINY, a, [1, *a.shape], timing.replace(seed=1))
    assert other != name_a
    # nor is the same arch in another space (its stem, head and widths are the space's)
    wider = dataclasses.replace(TINY, name="tiny-wider", head_width=48)
    assert timing_module._export_name(wider, a, [1, *a.shape], timing)[0] != name_a
