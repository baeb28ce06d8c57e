import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FEW_STEPS, ROOT, TRAINED_STEPS, tiny_args, tiny_artifact_args
from ofa.artifact import load_artifact
from ofa.train import ConfigError, PRESETS, load_config, train
from ofa.train.config import apply_overrides

PHASES = ["full", "kernel", "depth-1", "depth-2", "expand-1", "expand-2"]


def tiny_config(data_dir: Path, *extra: str, steps: dict[str, float] = TRAINED_STEPS):
    return load_config("quick", None, tiny_args(data_dir, steps) + list(extra))


def test_every_phase_runs_and_writes_an_artifact(tiny_artifact):
    """The shared tiny artifact, trained with evaluate_phases=all (tests/conftest.py): every phase ran, each
    evaluated its corners, and the artifact holds what the final checkpoint holds."""
    ends = [json.loads(line) for line in (tiny_artifact / "metrics.jsonl").read_text().splitlines()]
    results = {r["phase"]: r["val_accuracy"] for r in ends if r.get("event") == "phase_end"}
    assert [r["phase"] for r in ends if r.get("event") == "phase_end"] == PHASES == list(results)
    for phase in PHASES:
        assert set(results[phase]) == {"smallest", "largest", "middle-1", "middle-2"}
        assert all(0 <= v <= 100 for v in results[phase].values())
    steps = [r for r in ends if "img_per_s" in r]
    assert steps and all(r["img_per_s"] > 0 and r["loss"] > 0 for r in steps)
    art = load_artifact(tiny_artifact)
    assert art.space.name == "mbv3-small-images@24-28px" and art.space.resolutions == (24, 28)
    assert art.data.num_classes == 10
    assert art.calibration.dtype == torch.uint8 and art.calibration.shape == (64, 1, 28, 28)
    assert art.manifest["training"]["batch_size"] == 32
    assert art.data.class_names[0] == "T-shirt/top"
    # the artifact holds the weights of the final checkpoint, i.e. the trained supernet
    from ofa.train.checkpoint import load_checkpoint
    final = load_checkpoint(tiny_artifact / "checkpoints")
    assert final.state["phase_index"] == len(PHASES)
    for k, v in art.supernet.state_dict().items():
        assert torch.equal(v, final.model[k]), k


def test_artifact_tampering_is_detected(tiny_data, tmp_path):
    results = train(tiny_config(tiny_data, "phases.full.epochs=0.1", "phases.kernel.epochs=0.05",
                                "phases.depth-1.epochs=0.05", "phases.depth-2.epochs=0.05",
                                "phases.expand-1.epochs=0.05", "phases.expand-2.epochs=0.05"), tmp_path, progress=False)
    # the quick preset evaluates the corners after the last phase only
    assert [p for p in PHASES if results[p]] == ["expand-2"] and set(results["expand-2"]) >= {"smallest", "largest"}
    with open(tmp_path / "space.json", "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match="space.json does not match its sha256"):
        load_artifact(tmp_path)


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "supernet.safetensors"))


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_equal(tiny_data, tmp_path):
    # one thread each: the uninterrupted run and the one to kill run side by side, one core each
    cfg_args = tiny_args(tiny_data) + ["checkpoint_every=2", "threads=1"]
    ref_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    cmd = [sys.executable, "-m", "ofa", "train", "--no-progress", "--out"]
    sets = [x for a in cfg_args for x in ("--set", a)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref_log = tmp_path / "uninterrupted.log"  # a file, not a pipe nobody reads until the end
    with ref_log.open("w") as f:  # the child writes into its own copy of the descriptor
        ref = subprocess.Popen(cmd + [str(ref_dir)] + sets, env=env, stdout=subprocess.DEVNULL, stderr=f)

    # Kill the second run once it is well into the run (mid-phase), at whatever moment that is.
    proc = subprocess.Popen(cmd + [str(killed_dir)] + sets, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 9:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((killed_dir / "checkpoints" / "checkpoint.json").read_text())
    assert state["global_step"] > 0
    assert not (killed_dir / "manifest.json").exists()

    resumed = subprocess.run(cmd + [str(killed_dir), "--resume"] + sets, check=True, env=env, capture_output=True,
                             text=True)
    assert ref.wait(timeout=600) == 0, ref_log.read_text()[-3000:]
    # it went on from the checkpoint, not from the start (a restart would give the same weights too)
    assert (state["phase_index"], state["step_in_phase"]) != (0, 0)
    assert f"resuming at phase {state['phase_index']}, step {state['step_in_phase']}" in resumed.stderr
    want, got = _final_weights(ref_dir), _final_weights(killed_dir)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    steps = lambda d: json.loads((d / "checkpoints" / "checkpoint.json").read_text())["global_step"]  # noqa: E731
    assert steps(ref_dir) == steps(killed_dir)


def test_single_phase_runs_from_the_previous_checkpoint(tiny_data, tiny_artifact, tmp_path):
    cfg = tiny_config(tiny_data)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train(cfg, tmp_path, only_phase="kernel", progress=False)
    train(cfg, tmp_path, only_phase="full", progress=False)
    assert (tmp_path / "checkpoints" / "teacher.safetensors").exists()
    out = train(cfg, tmp_path, only_phase="kernel", progress=False)
    assert list(out) == ["full", "kernel"]
    # phase by phase gives the weights the uninterrupted run has at the same point, bit for bit (tiny_artifact
    # is that run, trained whole; it also evaluated its corners after every phase, which must change no weight and
    # draw nothing from the generators training draws from)
    (got,), (want,) = ([load_file(str(p)) for p in (d / "checkpoints" / "after-kernel").glob("model-*.safetensors")]
                       for d in (tmp_path, tiny_artifact))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_finished_phase_runs_again_with_other_settings(tiny_data, tiny_artifact, tmp_path):
    cfg = load_config("quick", None, tiny_artifact_args(tiny_data))
    tmp_path = tmp_path / "run"
    shutil.copytree(tiny_artifact, tmp_path)  # a finished run of this config
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("after-*")) == sorted(f"after-{p}" for p in PHASES)
    # The last phase again, with another lr, from the checkpoint the phase before it left.
    first = load_file(str(tmp_path / "supernet.safetensors"))
    again = apply_overrides(cfg, {"phases.expand-2.lr": 0.2})
    out = train(again, tmp_path, only_phase="expand-2", progress=False)
    assert list(out) == PHASES
    second = load_file(str(tmp_path / "supernet.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert json.loads((ckpts / "checkpoint.json").read_text())["config"]["phases"][-1]["lr"] == 0.2
    # The same settings give the same weights: the snapshot is the state the first run had.
    train(cfg, tmp_path, only_phase="expand-2", progress=False)
    third = load_file(str(tmp_path / "supernet.safetensors"))
    assert all(torch.equal(first[k], third[k]) for k in first)
    # A change to an earlier phase would make the snapshot a different computation.
    with pytest.raises(ConfigError, match=r"different values of \['phases'\]"):
        train(apply_overrides(cfg, {"phases.expand-1.lr": 0.2}), tmp_path, only_phase="expand-2", progress=False)


def test_sandwich_rule_runs(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "sandwich=true", "trace=true", "phases.kernel.subnets_per_step=3", steps=FEW_STEPS)
    train(cfg, tmp_path, progress=False)
    trace = [json.loads(line) for line in (tmp_path / "trace-rank0.jsonl").read_text().splitlines()]
    from ofa.space import get_space
    from ofa.train.config import phase_space
    space = phase_space(get_space("mbv3-small-images"), cfg.phase("depth-2"))
    depth_steps = [t for t in trace if t["phase"] == "depth-2"]
    assert depth_steps and all(t["archs"][0] == space.largest(t["resolution"]).id for t in depth_steps)
    assert all(t["archs"][1] == space.smallest(t["resolution"]).id for t in depth_steps)


@pytest.mark.slow
def test_torchrun_two_processes(tiny_data, tmp_path):
    sets = [x for a in tiny_args(tiny_data) + ["trace=true", "threads=1"] for x in ("--set", a)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ofa", "train", "--no-progress", "--out", str(tmp_path)] + sets
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    traces = [[json.loads(line) for line in (tmp_path / f"trace-rank{r}.jsonl").read_text().splitlines()]
              for r in (0, 1)]
    assert len(traces[0]) == len(traces[1]) >= 6
    for a, b in zip(*traces):
        assert (a["phase"], a["step"]) == (b["phase"], b["step"])
        assert a["archs"] == b["archs"] and a["resolution"] == b["resolution"]
        assert a["batch"] != b["batch"]
        assert a["weights"] == b["weights"]  # gradients are averaged: the ranks stay bit-identical
    assert len({t["weights"] for t in traces[0]}) == len(traces[0])  # while the weights do change
    load_artifact(tmp_path)


@pytest.mark.parametrize("assignment, message", [
    ("batch_sise=3", r"unknown key 'batch_sise'; allowed: \[.*'batch_size'"),
    ("batch_size=abc", "batch_size must be an integer, got 'abc'"),
    ("batch_size=-4", "batch_size must be a finite number >= 0"),
    ("sandwich=maybe", "sandwich must be true or false"),
    ("phases.kernal.epochs=1", r"unknown phase 'kernal'; phases are \['full', 'kernel'"),
    ("phases.kernel.speed=1", r"unknown key phases.kernel.'speed'"),
    ("phases.kernel.kernels=3,4", None),
    ("phases=1", "phase keys are written phases.NAME.KEY"),
    ("nonsense", "a config assignment takes KEY=VALUE"),
])
def test_bad_config_values_are_refused(assignment, message, tiny_data, tmp_path):
    if message is None:  # type-correct but outside the space: refused when the run starts
        cfg = load_config("quick", None, [assignment, f"data_dir={tiny_data}", "val_size=100"])
        with pytest.raises(ConfigError, match=r"phases.kernel.kernels has \[4\], not in the space's choices \[3, 5, 7\]"):
            train(cfg, tmp_path, progress=False)
        return
    with pytest.raises(ConfigError, match=message):
        load_config("quick", None, [assignment])


@pytest.mark.parametrize("assignments, message", [
    (["momentum=0"], "nesterov needs momentum > 0"),
    (["momentum=7"], r"momentum must be in \[0, 1\), got 7.0"),
    (["image_size=0"], "image_size must be >= 1"),
    (["phases.full.warmup_epochs=9"], r"phases.full.warmup_epochs must be <= its epochs"),
])
def test_values_the_optimiser_or_schedule_cannot_use_are_refused_before_any_work(assignments, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(load_config("quick", None, assignments), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_config_file_and_presets(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"batch_size": 64, "phases": {"full": {"epochs": 2}}}))
    cfg = load_config("fashion", str(f), ["seed=3"])
    assert cfg.batch_size == 64 and cfg.phase("full").epochs == 2 and cfg.seed == 3
    assert cfg.phase("kernel") == PRESETS["fashion"].phase("kernel")
    f.write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config("quick", str(f))
    with pytest.raises(ConfigError, match="unknown preset 'fast'; choose from"):
        load_config("fast")
    assert set(PRESETS) == {"quick", "fashion", "cifar10", "imagenet", "transfer"}
    assert apply_overrides(PRESETS["quick"], {}) == PRESETS["quick"]


def test_cli_reports_bad_config_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ofa", "train", "--out", str(tmp_path), "--set", "lr=1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown key 'lr'" in r.stderr and "Traceback" not in r.stderr


def test_resume_refuses_a_changed_configuration(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data)
    train(cfg, tmp_path, only_phase="full", progress=False)
    changed = apply_overrides(cfg, {"batch_size": 16})
    with pytest.raises(ConfigError, match=r"different values of \['batch_size'\]"):
        train(changed, tmp_path, resume=True, progress=False)
    with pytest.raises(ConfigError, match="starts from the weights that the 2 phase"):
        train(cfg, tmp_path, only_phase="depth-1", progress=False)
    index = tmp_path / "checkpoints" / "checkpoint.json"
    state = json.loads(index.read_text())
    assert state["trainer_version"] == 2
    index.write_text(json.dumps({**state, "trainer_version": 1}))  # written when a step averaged the losses
    with pytest.raises(ConfigError, match=r"trainer version 1 \(the subnets' losses of a step averaged\)"):
        train(cfg, tmp_path, resume=True, progress=False)
    index.write_text(json.dumps(state))
    (tmp_path / "checkpoints" / "teacher.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="is not the teacher this run's full phase wrote"):
        train(cfg, tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("assignment, message", [
    ("phases.full.lr=nan", "must be a finite number"),
    ("phases.full.epochs=inf", "must be a finite number"),
    ("log_every=0", "log_every must be >= 1"),
    ("label_smoothing=1.5", r"label_smoothing must be in \[0, 1\)"),
    ("phases.depth-2.depths=2,5", r"phases.depth-2.depths has \[5\]"),
])
def test_bad_values_fail_before_training_starts(assignment, message, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(load_config("quick", None, [f"data_dir={tiny_data}", assignment]), tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_manifest_digest_and_paths_are_checked(tiny_data, tmp_path):
    train(tiny_config(tiny_data, "phases.full.epochs=0.1", "phases.kernel.epochs=0.05",
                      "phases.depth-1.epochs=0.05", "phases.depth-2.epochs=0.05",
                      "phases.expand-1.epochs=0.05", "phases.expand-2.epochs=0.05"), tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    forged = {**manifest, "digest": "0" * 64}
    (tmp_path / "manifest.json").write_text(json.dumps(forged))
    with pytest.raises(ValueError, match="digest does not match"):
        load_artifact(tmp_path)
    escape = {**manifest, "files": {**manifest["files"], "../outside.json": "0" * 64}}
    (tmp_path / "manifest.json").write_text(json.dumps(escape))
    with pytest.raises(ValueError, match="points outside the artifact"):
        load_artifact(tmp_path)
    dropped = {**manifest, "files": {k: v for k, v in manifest["files"].items() if k != "supernet.safetensors"}}
    (tmp_path / "manifest.json").write_text(json.dumps(dropped))
    with pytest.raises(ValueError, match=r"does not list \['supernet.safetensors'\]"):
        load_artifact(tmp_path)


def test_the_schedule_warms_up_linearly_then_decays_to_zero():
    from ofa.train.schedule import warmup_cosine

    assert [warmup_cosine(0.4, s, 10, 4) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert warmup_cosine(0.4, 4, 10, 4) == 0.4
    assert 0 < warmup_cosine(0.4, 9, 10, 4) < 0.4 * 0.1
    # the two roundings of the angle that the supernet's and the baselines' weights were trained with
    trainer = [0.5 * 0.1 * (1 + math.cos(math.pi * ((s - 3) / 997))) for s in range(3, 1000)]
    scratch = [0.5 * 0.1 * (1 + math.cos(math.pi * (s - 3) / 997)) for s in range(3, 1000)]
    assert [warmup_cosine(0.1, s, 1000, 3) for s in range(3, 1000)] == trainer
    assert [warmup_cosine(0.1, s, 1000, 3, divide_first=False) for s in range(3, 1000)] == scratch


def test_weight_decay_spares_biases_norms_and_kernel_transforms():
    from ofa.space import get_space
    from ofa.supernet import Supernet
    from ofa.train.schedule import sgd

    net = Supernet(get_space("mbv3-small-images"))
    decayed, spared = sgd(net, 0.1, 3e-5, 0.9, True).param_groups
    names = {id(p): n for n, p in net.named_parameters()}
    assert decayed["weight_decay"] == 3e-5 and spared["weight_decay"] == 0.0
    assert all(p.dim() > 1 and "transform_" not in names[id(p)] for p in decayed["params"])
    assert any("transform_" in names[id(p)] for p in spared["params"])
    assert len(decayed["params"]) + len(spared["params"]) == len(list(net.parameters()))


def test_num_threads_is_restored():
    from ofa._torch import num_threads

    before = torch.get_num_threads()
    with num_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with num_threads(0):  # 0: torch's setting is left alone
        assert torch.get_num_threads() == before


def test_seeded_draws_what_manual_seed_draws_and_restores_the_generator():
    from ofa._torch import seeded

    torch.manual_seed(7)
    want = torch.randn(5)
    state = torch.random.get_rng_state()
    with seeded(7):
        got = torch.randn(5)
    assert torch.equal(got, want)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_training_leaves_torch_threads_and_generator_as_it_found_them(tiny_data, tmp_path):
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    train(tiny_config(tiny_data, "threads=1" if threads > 1 else "threads=2"), tmp_path, only_phase="full",
          progress=False)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_baseline_is_a_function_of_its_seed_and_leaves_the_generator_alone(tiny_data):
    import copy

    from ofa.data import load_dataset, split_validation
    from ofa.jobs.scratch import train_from_scratch
    from ofa.subnet import mobilenet_v3_small_baseline

    cfg = tiny_config(tiny_data)
    full, spec = load_dataset(cfg.dataset, str(tiny_data), True, cfg.image_size)
    train_set, _ = split_validation(full, 100, 0)
    torch.manual_seed(0)
    net = mobilenet_v3_small_baseline(0.25, 1, 10)
    weights = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever the generator's state, the seed decides the weights
        state = torch.random.get_rng_state()
        trained, stats = train_from_scratch(copy.deepcopy(net), 28, train_set, spec, cfg.to_dict(), 0.2, seed=3,
                                            progress=False)
        assert torch.equal(torch.random.get_rng_state(), state)
        weights.append(trained.state_dict())
    assert stats["steps"] == 3
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
