"""The timing worker: times networks in a process that does nothing else.

Run as a script (``python -I _timer.py``) by :mod:`ofa_client.timing`; it reads one
job (JSON) on stdin and writes JSON lines on stdout: ``{"done": k, "total": n}`` as
it goes, then ``{"result": ...}``. (Its other job, ``export``, writes ONNX files for the
ONNX runtimes, in two such processes side by side: for kits, int8, and more than
``ofa.predict.timing.IN_PROCESS_EXPORTS`` networks; fewer are exported in the caller.) It imports numpy and the one runtime being timed
(onnxruntime, OpenVINO, or torch):
onnxruntime never shares this process with torch's thread pool, which made it run
1.3-2.4x slower (PERF.md), and all onnxruntime sessions share one global thread pool,
because hundreds of per-session pools spinning after their calls made each other's
runs ~1.9x slower (measured: 20 subnets, 0.92 ms alone, 0.92 ms global, 1.75 ms
per-session).

The protocol: every item is warmed up and its calls per sample are set so that one
sample lasts ``sample_ms`` (a 30 us block gets hundreds of calls, a 5 ms subnet two);
then ``rounds`` passes, each in its own seeded random order, time ``samples`` samples
of every item, each sample preceded by a quarter of its calls as warm-up (switching
between networks leaves caches and threads cold). The result is every sample's
per-call time; the caller picks the statistic.
"""
from __future__ import annotations

import json
import math
import sys
import time

ONNX_RUNTIMES = ("onnxruntime", "openvino")  # the runtimes that time ONNX files here (each in its own worker)


def _onnx_runs(job: dict) -> list:
    import numpy as np
    import onnxruntime as ort

    ort.set_global_thread_pool_sizes(job["threads"], 1)
    runs = []
    for item in job["items"]:
        opts = ort.SessionOptions()
        opts.use_per_session_threads = False
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(item["file"], opts, providers=[job.get("provider") or "CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal(item["shape"]).astype(np.float32)
        runs.append(lambda s=session, feed={name: x}: s.run(None, feed))
    return runs


def _openvino_runs(job: dict) -> list:
    """OpenVINO on the CPU, reading the ONNX files as a deployment does: each model reshaped to its static
    input shape (a served file's batch axis is dynamic, and a dynamic model ran ~25% slower here), one
    compiled model and infer request per network, tuned for latency (one stream) with the job's threads."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": job["threads"], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    runs = []
    for item in job["items"]:
        model = core.read_model(item["file"])
        model.reshape(item["shape"])
        request = core.compile_model(model, "CPU", config).create_infer_request()
        x = np.random.default_rng(0).standard_normal(item["shape"]).astype(np.float32)
        runs.append(lambda r=request, x=x: r.infer([x]))
    return runs


def _torch_runs(job: dict) -> list:
    import torch

    from ofa._torch import seeded
    from ofa.export import FORMATS, run_format
    from ofa.space import SearchSpace
    from ofa.subnet import module_of

    space = SearchSpace.from_dict(job["space"]) if job.get("space") else None
    runs = []
    with seeded(0):  # random weights and inputs: their values do not change the time, but stay the same
        for item in job["items"]:
            if "file" in item:  # a served subnet's file, in the format torch runs
                with open(item["file"], "rb") as f:
                    module = FORMATS[run_format("torch")].read(f.read())
            else:
                module = module_of(space, item["part"])
            x = torch.randn(*item["shape"])
            module = module.eval()
            if job.get("channels_last"):
                module, x = module.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
            runs.append(lambda m=module, x=x: m(x))
    return runs


def _per_call_ms(run, calls: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        run()
    return (time.perf_counter_ns() - t0) / calls / 1e6


def _calls_per_sample(run, sample_ms: float, warmup_ms: float) -> int:
    """Warm ``run`` up for ``warmup_ms`` (at least 3 calls), then size a sample from its speed."""
    t_end, calls = time.perf_counter() + warmup_ms / 1000, 0
    while calls < 3 or time.perf_counter() < t_end:
        run()
        calls += 1
    estimate = max(_per_call_ms(run, 3), 1e-4)
    return max(1, math.ceil(sample_ms / estimate))


def _time(job: dict, runs: list, report) -> dict:
    import numpy as np

    n, rounds, samples = len(runs), job["rounds"], job["samples"]
    calls = [_calls_per_sample(run, job["sample_ms"], job["warmup_ms"]) for run in runs]
    times = np.zeros((n, rounds, samples))
    rng = np.random.default_rng(job["seed"])
    done, orders = 0, []
    for r in range(rounds):
        orders.append(rng.permutation(n).tolist())
        for i in orders[-1]:
            run, c = runs[i], calls[i]
            _per_call_ms(run, max(1, c // 4))
            for s in range(samples):
                times[i, r, s] = _per_call_ms(run, c)
            done += 1
            if done % 16 == 0 or done == n * rounds:
                report({"done": done, "total": n * rounds})
    return {"times_ms": times.tolist(), "calls": calls, "orders": orders}


def _export(job: dict, report) -> None:
    """The other job: export parts to ONNX files (a process each of several, so that they run in parallel)."""
    sys.path.insert(0, job["root"])
    from ofa.export import export_parts
    from ofa.space import SearchSpace

    space = SearchSpace.from_dict(job["space"]) if job.get("space") else None
    export_parts(space, job["export"], job.get("backend", "onnxruntime"), job.get("precision", "fp32"),
                 lambda done: report({"exported": done}))
    report({"result": "exported"})


def main() -> None:
    job = json.loads(sys.stdin.read())
    out = sys.stdout

    def report(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    if "export" in job:
        _export(job, report)
        return
    if job["backend"] in ONNX_RUNTIMES:
        runs = (_onnx_runs if job["backend"] == "onnxruntime" else _openvino_runs)(job)
        report({"loaded": len(runs)})
        report({"result": _time(job, runs, report)})
        return
    sys.path.insert(0, job["root"])  # the folder that holds the ofa package
    import torch

    from ofa._torch import num_threads

    with num_threads(job["threads"]):
        runs = _torch_runs(job)
        report({"loaded": len(runs)})
        # timed as a deployment runs a network, without autograd (before, a guard entered and dropped at once
        # ended at once: the torch backend timed with autograd on)
        with torch.inference_mode():
            report({"result": _time(job, runs, report)})


if __name__ == "__main__":
    main()
