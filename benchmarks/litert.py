"""LiteRT (issue 36, stretch): served subnets converted by litert-torch and timed by ai-edge-litert, beside
the same subnets' served ONNX files in onnxruntime.

For ``--subnets`` archs of the artifact (its smallest, its largest and seeded random ones), the served
subnet (BN re-calibrated, as ``GetSubnetWeights`` serves it) is converted by ``litert_torch.convert``
twice (time, and whether the two ``.tflite`` byte strings are equal), its outputs are compared with
torch's, and both files are timed at batch 1 with 2 threads in one worker process that imports only the
two runtimes (no torch): interleaved rounds, the median per file. It needs a venv of its own, since
litert-torch pulls jax, transformers and CUDA wheels (6.6 GB here) and pins torch < 2.15:

    python3 -m venv /tmp/ltvenv && /tmp/ltvenv/bin/pip install litert-torch ai-edge-litert onnx onnxruntime \\
        torch==2.14.1 torchvision==0.29.1 && /tmp/ltvenv/bin/pip install --no-deps ./client
    cd benchmarks && PYTHONPATH=.. /tmp/ltvenv/bin/python litert.py --artifact A [--subnets 6] [--json F]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import fingerprint
from ofa.artifact import load_artifact
from ofa.export import export_onnx, read_subnet, subnet_file

WORKER = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter

job = json.loads(sys.stdin.read())
runs = []
for item in job["items"]:
    x = np.random.default_rng(0).standard_normal(item["shape"]).astype(np.float32)
    if item["file"].endswith(".tflite"):
        it = Interpreter(model_path=item["file"], num_threads=2)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        runs.append(it.invoke)
    else:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        s = ort.InferenceSession(item["file"], opts, providers=["CPUExecutionProvider"])
        runs.append(lambda s=s, feed={s.get_inputs()[0].name: x}: s.run(None, feed))
for run in runs:  # warm-up
    for _ in range(50):
        run()
times = [[] for _ in runs]
for _ in range(job["rounds"]):
    for k, run in enumerate(runs):
        t0 = time.perf_counter()
        for _ in range(job["calls"]):
            run()
        times[k].append((time.perf_counter() - t0) / job["calls"] * 1e3)
print(json.dumps([float(np.median(t)) for t in times]))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--subnets", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--json")
    a = p.parse_args()
    import litert_torch
    from importlib.metadata import version

    fp = fingerprint()
    art = load_artifact(a.artifact)
    space = art.space
    archs = [space.smallest(), space.largest()] + [space.sample(a.seed + k) for k in range(max(0, a.subnets - 2))]
    rows, items = [], []
    with tempfile.TemporaryDirectory(prefix="ofa-litert-") as tmp:
        for arch in archs:
            module, _ = read_subnet(subnet_file(art, arch, "safetensors").data)
            x = torch.randn(1, space.in_channels, arch.resolution, arch.resolution)
            t0 = time.perf_counter()
            edge = litert_torch.convert(module.eval(), (x,))
            seconds = time.perf_counter() - t0
            path = Path(tmp) / f"{arch.id}.tflite"
            edge.export(str(path))
            again = Path(tmp) / f"{arch.id}-again.tflite"
            litert_torch.convert(module.eval(), (x,)).export(str(again))
            with torch.no_grad():
                diff = float(np.abs(np.asarray(edge(x)) - module(x).numpy()).max())
            onnx_path = Path(tmp) / f"{arch.id}.onnx"
            onnx_path.write_bytes(export_onnx(module, x, dynamic_batch=False))
            shape = list(x.shape)
            items += [{"file": str(path), "shape": shape}, {"file": str(onnx_path), "shape": shape}]
            rows.append({"id": arch.id, "resolution": arch.resolution, "convert_seconds": round(seconds, 1),
                         "tflite_bytes": path.stat().st_size,
                         "deterministic": hashlib.sha256(path.read_bytes()).digest()
                         == hashlib.sha256(again.read_bytes()).digest(),
                         "max_abs_diff_vs_torch": diff})
            print(json.dumps(rows[-1]), flush=True)
        job = {"items": items, "rounds": a.rounds, "calls": a.calls}
        r = subprocess.run([sys.executable, "-c", WORKER], input=json.dumps(job), capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"the timing worker failed:\n{r.stderr[-3000:]}")
        ms = json.loads(r.stdout.strip().splitlines()[-1])
    for row, (lite, onnx) in zip(rows, zip(ms[0::2], ms[1::2])):
        row.update({"litert_ms": round(lite, 4), "onnxruntime_ms": round(onnx, 4), "ratio": round(lite / onnx, 3)})
        print(f"{row['id']} @{row['resolution']}px: LiteRT {lite:.3f} ms, onnxruntime {onnx:.3f} ms "
              f"(x{lite / onnx:.2f}); converted in {row['convert_seconds']} s, same bytes twice: "
              f"{row['deterministic']}, max |LiteRT - torch| {row['max_abs_diff_vs_torch']:.1e}")
    out = {"fingerprint": fp, "versions": {k: version(k) for k in ("litert-torch", "ai-edge-litert", "onnxruntime",
                                                                    "torch")}, "subnets": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
