"""A latency table against an independent, torch-free timer, and where the difference comes from (issue 33).

The table's figures come from the timing protocol (:mod:`ofa.predict.timing`): every network of a
profile (~270 blocks and ~90 subnets) loaded in one worker process, on one shared onnxruntime thread
pool, timed in interleaved passes. A device runs one model in a process. This script exports
``--archs`` seeded random subnets the table never saw to ONNX and times each of them

- **independently**: a fresh Python process per subnet, importing only numpy and onnxruntime, with
  a default session (its own ``threads`` intra-op threads, as a deployment makes it), warmed up, then
  ``--rounds`` rounds of ``--runs`` calls; the median round. Two passes in opposite orders (the
  machine's drift shows as their disagreement);
- by the protocol alone (a worker with just these subnets);
- by the protocol among a profile's networks (every block of the space loaded and interleaved too);

and compares the table's raw prediction (no recalibration) with each: the share within ±10%, Spearman,
and the median ratio (the table's level). ``--load N`` runs N busy loops at nice 10 beside everything.

    python benchmarks/independent_timer.py --artifact DIR --target NAME [--archs 50] [--load 0]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import busy_loops, fingerprint
from ofa.artifact import latency_file, open_artifact
from ofa.predict.latency import LatencyPredictor, Speed, iter_plan
from ofa.predict.profile import timing_of_table
from ofa.predict.timing import Part, spearman, subnet_part, time_parts

_ALONE = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
path, threads, runs, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
opts.log_severity_level = 3
s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
inp = s.get_inputs()[0]
x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)
feed = {inp.name: x}
for _ in range(max(20, runs // 2)):
    s.run(None, feed)
means = []
for _ in range(rounds):
    t = time.perf_counter_ns()
    for _ in range(runs):
        s.run(None, feed)
    means.append((time.perf_counter_ns() - t) / runs / 1e6)
print(json.dumps(float(np.median(means))))
"""


def time_alone(files: list[Path], threads: int, runs: int, rounds: int) -> np.ndarray:
    """Each file timed in a fresh torch-free process of its own (two passes, opposite orders; their mean)."""
    env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    passes = []
    for order in (range(len(files)), reversed(range(len(files)))):
        ms = np.zeros(len(files))
        for i in order:
            out = subprocess.run([sys.executable, "-I", "-c", _ALONE, str(files[i]), str(threads), str(runs),
                                  str(rounds)], capture_output=True, text=True, env=env, check=True)
            ms[i] = json.loads(out.stdout)
        passes.append(ms)
    a, b = passes
    print(f"  independent passes agree: Spearman {spearman(a, b):.3f}, median ratio {np.median(a / b):.3f}")
    return (a + b) / 2


def compare(name: str, predicted: np.ndarray, measured: np.ndarray) -> dict:
    err = predicted / measured - 1
    row = {"within_10pct": float(np.mean(np.abs(err) <= 0.10)), "spearman": float(spearman(predicted, measured)),
           "median_ratio": float(np.median(predicted / measured)), "mean_abs_rel_error": float(np.mean(np.abs(err)))}
    print(f"  {name:44s} within ±10% {row['within_10pct']:5.0%}   Spearman {row['spearman']:.3f}   "
          f"predicted/measured median x{row['median_ratio']:.3f}   mean |error| {row['mean_abs_rel_error']:.1%}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--archs", type=int, default=50)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--load", type=int, default=0, help="busy loops at nice 10 beside the timings")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    print(fingerprint())
    files = open_artifact(args.artifact)
    space, table = files.space(), files.read_json(latency_file(args.target))
    timing = timing_of_table(table)
    if timing.backend != "onnxruntime":
        sys.exit("the independent timer runs onnxruntime: profile the target with --backend onnxruntime")
    raw = LatencyPredictor(space, table).with_speed(Speed())
    rng = np.random.default_rng([args.seed, 7])
    archs = list({a.id: a for a in (space.sample(rng) for _ in range(args.archs * 2))}.values())[: args.archs]
    predicted = raw(space.encode(archs))
    out: dict = {"archs": len(archs), "threads": timing.threads, "load": args.load,
                 "repeatability_when_profiled": (table.get("timing") or {}).get("repeatability")}
    with tempfile.TemporaryDirectory() as tmp, busy_loops(args.load):
        from ofa.export import export_onnx
        from ofa.subnet import module_of

        import torch

        paths = []
        for i, a in enumerate(archs):
            part = subnet_part(space, a)
            torch.manual_seed(i)
            module = module_of(space, part.to_dict()).eval()
            paths.append(Path(tmp) / f"{i}.onnx")
            paths[-1].write_bytes(export_onnx(module, torch.randn(timing.batch, *part.shape), dynamic_batch=False))
        parts = [subnet_part(space, a, str(f)) for a, f in zip(archs, paths)]
        print(f"{len(archs)} random subnets; timing each alone in its own torch-free process "
              f"({args.rounds} x {args.runs} runs, {timing.threads} threads), two passes")
        alone = time_alone(paths, timing.threads, args.runs, args.rounds)
        print("the protocol with these subnets only")
        small = time_parts(space, parts, timing).ms
        print("the protocol among a profile's networks (every block of the space too)")
        blocks = [Part(e.kind, e.in_shape, block=e.block) for e in iter_plan(space, 0)]
        crowd = time_parts(space, blocks + parts, timing).ms[len(blocks):]
    print("results (predicted = the table's raw prediction; measured = each timer)")
    out["table_vs_alone"] = compare("table (raw) vs independent timer", predicted, alone)
    out["table_vs_protocol_small"] = compare("table (raw) vs protocol, these subnets only", predicted, small)
    out["table_vs_protocol_crowd"] = compare("table (raw) vs protocol among a profile's", predicted, crowd)
    out["protocol_small_vs_alone"] = compare("protocol, these only, vs independent timer", small, alone)
    out["protocol_crowd_vs_alone"] = compare("protocol among a profile's vs independent", crowd, alone)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
