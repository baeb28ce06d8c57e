"""Latency figures taken only on a quiet machine: the noise gate of the timing protocol, the wait for an
idle server before anything is timed, and search workers warmed up before the server says SERVING."""
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import ofa.predict.timing as timing_mod
from ofa.jobs import report
from ofa.jobs.service import ServerProcess, tree_cpu_seconds
from ofa.predict.timing import NoisyTiming, Timing, Timings, time_parts_trusted


def _timings(noise: float, rounds: int, seed: int = 0) -> Timings:
    """Timings of 12 networks whose odd passes disagree with the even ones by ``noise`` per network (as a
    second process that comes and goes does), however many rounds there are."""
    rng = np.random.default_rng(seed)
    n = 12
    orders = np.array([rng.permutation(n) for _ in range(rounds)])
    samples = np.repeat(np.linspace(0.5, 1.5, n)[:, None, None], rounds, 1).repeat(2, 2)
    samples[:, 1::2] *= (1 + noise * np.where(np.arange(n) % 2, 1, -0.5))[:, None, None]
    return Timings(samples, (1,) * n, 0.1, orders)


def test_a_noisy_run_is_timed_again_with_twice_the_rounds_and_a_quiet_one_is_kept(monkeypatch):
    calls = []

    def fake(space, parts, timing, progress=False, desc="timing", exported=None):
        calls.append(timing.rounds)
        return _timings(0.3 if len(calls) == 1 else 0.0, timing.rounds)

    monkeypatch.setattr(timing_mod, "time_parts", fake)
    said = []
    got = time_parts_trusted(None, ["x"], Timing(rounds=6), say=said.append)
    assert calls == [6, 12] and got.repeatability()["trusted"]
    assert "too noisy" in said[0] and "12 rounds" in said[0]


def test_a_run_that_stays_noisy_is_refused_with_its_verdict_and_the_last_timings(monkeypatch):
    calls = []

    def fake(space, parts, timing, progress=False, desc="timing", exported=None):
        calls.append(timing.rounds)
        return _timings(0.3, timing.rounds, seed=len(calls))

    monkeypatch.setattr(timing_mod, "time_parts", fake)
    with pytest.raises(NoisyTiming, match="3 attempts, the last with 24 rounds.*too noisy") as e:
        time_parts_trusted(None, ["x"], Timing(rounds=6), desc="re-time references", say=lambda m: None)
    assert calls == [6, 12, 24] and e.value.timings.samples_ms.shape[1] == 24


def test_the_report_refuses_an_untrusted_timing_unless_told_and_then_labels_it(monkeypatch):

    last = _timings(0.3, 6)

    def always_noisy(*a, **k):
        raise NoisyTiming("re-time references: 3 attempts, too noisy", last)

    monkeypatch.setattr(timing_mod, "time_parts_trusted", always_noisy)
    run = report._Run(art=SimpleNamespace(space=None), target="t", out=None, table={}, timing=Timing(), progress=False, log=lambda s: None)
    with pytest.raises(NoisyTiming, match="too noisy. The latency figures would not be trustworthy"):
        run.time([], "re-time references")
    run.accept_noisy = True
    assert run.time([], "re-time references") is last and run.untrusted == ["re-time references"]


def test_the_cli_names_the_flag_that_accepts_a_noisy_timing(monkeypatch, tmp_path, capsys):
    from ofa.cli import main

    def noisy(*a, **k):
        raise NoisyTiming("re-time references: 3 attempts, too noisy", _timings(0.3, 6))

    monkeypatch.setattr(report, "run_report", noisy)
    assert main(["report", "--artifact", str(tmp_path), "--target", "t", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ofa report: error: re-time references: 3 attempts, too noisy" in err and "--accept-noisy-timing" in err


_BURN_THEN_IDLE = """
import sys, time
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    pass
open(sys.argv[1], "w").write("burnt")
print("listening on 127.0.0.1:1", flush=True)
time.sleep(60)
"""


def test_nothing_is_timed_before_the_server_processes_are_idle(tmp_path):
    """A stand-in for a server that is still starting (it burns a core for a second and a half, then says it
    is done and goes idle): wait_idle returns only after the burn."""
    marker = tmp_path / "burnt"
    proc = ServerProcess([], tmp_path / "server.log")
    proc.cmd = [sys.executable, "-c", _BURN_THEN_IDLE, str(marker), "1.5"]
    log = open(tmp_path / "server.log", "wb")
    proc.proc = subprocess.Popen(proc.cmd, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        assert tree_cpu_seconds(proc.proc.pid) is not None
        said = proc.wait_idle(timeout=60)
        assert marker.exists() and "idle" in said
    finally:
        proc.stop(5)


def test_search_workers_search_once_before_the_server_says_serving(tmp_path, tiny_artifact):
    from conftest import served_copy
    from ofa_client import Client
    from ofa_server.main import ServeConfig, Server
    from ofa_server.registry import Registry

    art = served_copy(tiny_artifact, tmp_path / "tiny")
    srv = Server(Registry([str(art)], str(tmp_path / "targets")), ServeConfig(port=0, max_searches=2)).start()
    try:
        assert srv.service.pool.warmed() == [1, 1]  # every worker, each artifact's scorer, before SERVING
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            assert c.health() == "SERVING"
    finally:
        srv.stop(0)
