"""Helpers shared by the benchmark scripts: find and run the reference package."""
from __future__ import annotations

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
