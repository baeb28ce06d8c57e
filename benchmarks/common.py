"""Helpers shared by the benchmark scripts: the machine fingerprint, busy loops beside a measurement (a shared
machine), and finding and running the reference package."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE_DIR = ROOT / ".venv" / "ref-ofa"


def reference_dir() -> Path:
    """Where the reference ``ofa`` package is installed (``make reference`` puts it there)."""
    path = Path(os.environ.get("OFA_REFERENCE_DIR", DEFAULT_REFERENCE_DIR)).resolve()
    if not (path / "ofa" / "__init__.py").exists():
        sys.exit(f"the reference package is not installed in {path}; run `make reference` "
                 f"(or set OFA_REFERENCE_DIR to a folder made by "
                 f"`pip install --no-deps --target DIR ofa`)")
    return path


def run_reference(task: str, **args) -> dict:
    """Run one task of ``_reference_worker.py`` in its own process and return its JSON."""
    worker = Path(__file__).with_name("_reference_worker.py")
    out = subprocess.run(
        [sys.executable, str(worker), str(reference_dir()), task, json.dumps(args)],
        capture_output=True, text=True, cwd="/",
    )
    if out.returncode != 0:
        sys.exit(f"the reference worker failed on task {task!r}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    return f"mean {statistics.fmean(ms):.1f} ms, median {statistics.median(ms):.1f} ms (n={len(ms)})"


_FINGERPRINT = """
import json, statistics, time, torch, torchvision
torch.set_num_threads(2)
a = torch.zeros(64, 64)
for _ in range(2000):
    a.add_(1)
adds = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(10000):
        a.add_(1)
    adds.append((time.perf_counter() - t) / 10000 * 1e6)
m = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
x = torch.randn(1, 3, 28, 28)
runs = []
with torch.inference_mode():
    for _ in range(50):
        m(x)
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(100):
            m(x)
        runs.append((time.perf_counter() - t) / 100 * 1e3)
print(json.dumps({"add_us": statistics.median(adds), "mbv3_small_ms": statistics.median(runs),
                  "mbv3_small_range_ms": [min(runs), max(runs)]}))
"""


def fingerprint() -> dict:
    """The machine fingerprint every latency or speed figure carries (PERF.md): a tiny torch op
    (``a.add_(1)`` on 64x64) in microseconds, and torchvision ``mobilenet_v3_small`` at 28 px, batch 1,
    2 threads, eager, in ms; measured in a fresh process. Also printed, with the CPU and core count."""
    out = subprocess.run([sys.executable, "-c", _FINGERPRINT], capture_output=True, text=True, cwd="/")
    if out.returncode:
        sys.exit(f"the fingerprint failed:\n{out.stderr[-2000:]}")
    fp = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    fp.update(cpu=cpu, cores=os.cpu_count())
    lo, hi = fp["mbv3_small_range_ms"]
    print(f"machine fingerprint: {cpu}, {fp['cores']} cores; torch a.add_(1) 64x64 {fp['add_us']:.2f} us; "
          f"mobilenet_v3_small @28 px, batch 1, 2 threads, eager {fp['mbv3_small_ms']:.2f} ms "
          f"({lo:.2f}-{hi:.2f})", flush=True)
    return fp


@contextlib.contextmanager
def busy_loops(n: int, nice: int = 10):
    """``n`` processes spinning at ``nice`` until the block ends."""
    procs = [subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def target_references(artifact: str, target: str):
    """A target's table in ``artifact``, for scripts that re-time its references: (the space, the table's
    reference archs, their profiled ms as an array, the table's own timing protocol)."""
    import numpy as np

    from ofa.artifact import latency_file, load_artifact
    from ofa.predict.profile import timing_of_table

    art = load_artifact(artifact)
    table = art.files.read_json(latency_file(target))  # the artifact names its files
    space = art.space
    refs = [space.arch_from_json(json.dumps(r["arch"])) for r in table["references"]]
    return space, refs, np.array([r["ms"] for r in table["references"]]), timing_of_table(table)
