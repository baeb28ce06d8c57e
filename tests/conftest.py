import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ofa.space import get_space, space_digest, space_names
from ofa.supernet import Supernet

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN statistics, BN affine and kernel transforms non-trivial values.

    A freshly initialised net has identity BN statistics and identity transforms,
    which would hide slicing or ordering mistakes in eval-mode comparisons.
    """
    g = torch.Generator().manual_seed(seed)
    for name, t in net.state_dict().items():
        if name.endswith("running_mean") or name.endswith("bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif name.endswith("running_var") or (name.endswith("weight") and t.dim() == 1):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif ".transform_" in name:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return net


@pytest.fixture(scope="session", params=space_names())
def space(request):
    return get_space(request.param)


@pytest.fixture(scope="session")
def supernets():
    """One perturbed supernet per registered space, in eval mode (treat as read-only)."""
    torch.manual_seed(0)
    return {name: perturb(Supernet(get_space(name))).eval() for name in space_names()}


def reference_dir() -> Path:
    """The reference package folder made by `make reference`; its absence is a failure."""
    path = Path(os.environ.get("OFA_REFERENCE_DIR", ROOT / ".venv" / "ref-ofa")).resolve()
    if not (path / "ofa" / "__init__.py").exists():
        pytest.fail(f"reference package missing in {path}: run `make reference` "
                    "(make test does it); this check is never skipped")
    return path


def write_idx_dataset(folder: Path, n_train: int = 640, n_test: int = 160, seed: int = 0) -> Path:
    """A tiny dataset in Fashion-MNIST's on-disk format (gzipped idx files).

    Each class is a bright bar at a class-specific position plus noise, so a few
    steps of training learn something; the real loading code reads it via --data-dir.
    """
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 5 + 2 * c, 4:24] = 220
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return folder


def jpeg_tree(folder: Path, classes, per_class: int = 24, size: int = 64) -> Path:
    """``folder/CLASS/*.jpg`` for each name in ``classes``: seeded random images of varied shapes, each
    class around its own colour, and ``folder/CLASS0/999-broken.jpg``, which is no image (returned)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            base = rng.integers(0, 200, 3) + 40 * c
            pixels = (rng.integers(0, 56, (size, size + 8 * (i % 3), 3)) + base).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.jpg", quality=90)
    broken = folder / classes[0] / "999-broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    return broken


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("tiny-fmnist"))


# epochs a phase (17 steps an epoch). The tiny artifact's 20 steps: its served int8 files must pick the classes its
# fp32 weights pick for most images, which 13 steps' near-tied logits did not (OpenVINO's, 10 of 16)
TRAINED_STEPS = {"full": 0.4, "kernel": 0.2, "depth-1": 0.1, "depth-2": 0.2, "expand-1": 0.1, "expand-2": 0.2}
# a run a test trains for what training does (phases, resume, ranks), not for its weights: 3 steps, then 2 a phase
FEW_STEPS = {"full": 0.2, "kernel": 0.1, "depth-1": 0.1, "depth-2": 0.1, "expand-1": 0.1, "expand-2": 0.1}


def tiny_args(data_dir: Path, steps: dict[str, float] = TRAINED_STEPS) -> list[str]:
    """--set assignments for a run of a few steps per phase on the tiny dataset."""
    args = [f"data_dir={data_dir}", "val_size=100", "calib_size=64", "batch_size=32",
            "eval_batch_size=200", "log_every=2", "threads=2", "checkpoint_every=3"]
    return args + [f"phases.{p}.epochs={e}" for p, e in steps.items()]


def tiny_artifact_args(data_dir: Path) -> list[str]:
    """The --set assignments :func:`tiny_artifact` was trained with (a test that trains it on needs the same)."""
    return tiny_args(data_dir) + ["evaluate_phases=all"]


@pytest.fixture(scope="session")
def tiny_artifact(tiny_data, tmp_path_factory):
    """A supernet trained for a few steps on the tiny dataset (read-only: copy it to change it), its corners
    evaluated after every phase (tests/test_train.py checks those; a run of its own cost ~10 s)."""
    from ofa.train import load_config, train

    out = tmp_path_factory.mktemp("tiny-artifact")
    train(load_config("quick", None, tiny_artifact_args(tiny_data)), out, progress=False)
    return out


FULL_RUN = 300  # tests passed: a run of the whole suite, whose time is measured (README, PERF.md)


def pytest_terminal_summary(terminalreporter):
    """The disk and memory left at the end: a run that failed for want of either says so in its last lines.
    After a run of the whole suite, also the machine fingerprint (PERF.md), taken then, in a fresh process: the
    suite's time is only comparable between machines with it."""
    import shutil
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free  # the run's own folder is gone when it passed
    try:
        with open("/proc/meminfo") as f:
            mem = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)}
    except OSError:
        mem = {}
    terminalreporter.write_line(f"disk: {free / 2**30:.1f} GiB free where the tests write; memory: "
                                f"{mem.get('MemAvailable', 0) / 2**20:.1f} GiB available")
    if len(terminalreporter.stats.get("passed", ())) >= FULL_RUN:  # the suite's time means little without it
        fp = subprocess.run([sys.executable, "-c", "from common import fingerprint; fingerprint()"], text=True,
                            cwd=ROOT / "benchmarks", capture_output=True)
        terminalreporter.write_line(fp.stdout.strip() or f"machine fingerprint: failed: {fp.stderr[-500:]}")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Derived dataset files go to a per-session cache, not the user's ~/.cache."""
    monkeypatch.setenv("OFA_CACHE", str(tmp_path_factory.getbasetemp() / "ofa-cache"))


def synthetic_table(space, target: str = "synthetic-cpu", seed: int = 0) -> dict:
    """A latency table in the real format whose per-block values are seeded numbers (not timings)."""
    import numpy as np

    from ofa.predict.latency import TABLE_FORMAT, TABLE_VERSION, block_plan
    from ofa_client.latency_model import identity_model

    entries, _, _ = block_plan(space)
    rng = np.random.default_rng(seed)
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "target": target,
            "space": {"name": space.name, "digest": space_digest(space)},
            "device": {"cpu": "synthetic", "threads": 1, "backend": "none"},
            "entries": {k: float(rng.uniform(0.01, 0.2)) for k in sorted(entries)},
            "model": identity_model(space.num_stages, space.resolutions),
            "references": [{"arch": space.smallest().to_dict(), "ms": 1.0}, {"arch": space.largest().to_dict(), "ms": 3.0}]}


def synthetic_predictor(space):
    """A ridge accuracy predictor fitted to 'accuracy grows with log-MACs' (not to measurements)."""
    import numpy as np

    from ofa.predict.accuracy import arch_features, fit_family
    from ofa.predict.cost import CostModel

    codes = space.sample_codes(0, 400)
    macs = CostModel(space).macs(codes)
    y = 80 + 4 * np.log(macs / macs.min()) + np.random.default_rng(0).normal(0, 0.3, len(codes))
    return fit_family("ridge-3", arch_features(space, codes), y, space_digest(space))


def served_copy(artifact, dest, target: str = "synthetic-cpu"):
    """A copy of ``artifact`` at ``dest`` with the synthetic accuracy predictor and latency table added."""
    import json
    import shutil

    from ofa.artifact import add_file, load_artifact

    shutil.copytree(artifact, dest)
    space = load_artifact(dest).space
    add_file(dest, "accuracy_predictor.safetensors", synthetic_predictor(space).to_bytes())
    add_file(dest, f"latency/{target}.json", json.dumps(synthetic_table(space, target)))
    return dest


def until(cond, timeout=120.0, what="the condition"):
    """Wait for ``cond()`` (a state the server reaches on its own), failing the test after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"{what} did not hold within {timeout:.0f} s")
