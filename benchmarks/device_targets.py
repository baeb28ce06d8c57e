"""Devices made targets with only the light client, per runtime and precision (issue 36), end to end.

For each ``--combo RUNTIME:PRECISION`` (default onnxruntime:fp32, openvino:fp32, onnxruntime:int8; also
openvino:int8):

1. ``ofa profile --kit`` writes the profiling kit of the artifact's space (once per served format: fp32 ONNX
   for both runtimes, int8 quantized by the runtime's quantizer);
2. ``ofa-client profile`` from ``--client-venv`` (a venv with only ``pip install './client[onnx,openvino]'``:
   no torch, no ofa) times it and registers the table with a running ``ofa serve``; then a search
   for that target and a fetch of the runtime's format, timed;
3. ``ofa profile`` times the same space here with the full stack, for comparison;
4. ``tables_vs_timing.py``: both tables against an independent pass over 50 fresh random subnets;
5. ``ofa report`` on a copy of the artifact holding the light table: the served subnets of 3 budgets,
   predicted against measured latency, and their test accuracy (int8: of the int8 file).

    cd benchmarks && ../.venv/bin/python device_targets.py --artifact A --client-venv V --out DIR
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import fingerprint
from ofa.artifact import add_file, load_artifact
from ofa.export import run_format
from ofa.jobs.service import ServerProcess

HERE = Path(__file__).resolve().parent
OFA = [sys.executable, "-m", "ofa"]


def run(cmd: list[str], log: Path) -> str:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}  ({time.perf_counter() - t0:.1f} s, exit {r.returncode})\n{r.stdout}{r.stderr}\n")
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r.stdout


def combo(rt: str, prec: str, a: argparse.Namespace, out: Path, kit: Path, server: ServerProcess) -> dict:
    log, name = out / "log.txt", f"{rt}-{prec}"
    client = [str(a.client_venv / "bin" / "ofa-client"), "--address", server.address, "--json"]
    light, full = out / f"light-{name}.json", out / f"ofa-{name}.json"
    t0 = time.perf_counter()
    summary = json.loads(run([*client, "profile", "--kit", str(kit), "--target", f"light-{name}", "--runtime", rt,
                              "--out", str(light), "--replace"], log))
    profile_s = time.perf_counter() - t0
    fmt = run_format(rt, prec)
    t0 = time.perf_counter()
    found = run([*client, "search", "--target", f"light-{name}", "--max-latency-ms", "1000"], log)
    (out / "found.json").write_text(found)
    run([*client, "fetch", "--arch", f"@{out / 'found.json'}", "--format", fmt, "--out", str(out / f"{name}.onnx")],
        log)
    search_fetch_s = time.perf_counter() - t0
    run([*OFA, "profile", "--space-file", str(out / "space.json"), "--target", f"ofa-{name}", "--backend", rt,
         "--precision", prec, "--out", str(full), "--no-progress"], log)
    vs = out / f"vs-{name}.json"
    run([sys.executable, str(HERE / "tables_vs_timing.py"), "--space-file", str(out / "space.json"),
         "--table", str(light), "--table", str(full), "--json", str(vs)], log)
    art = out / f"art-{name}"
    shutil.copytree(a.artifact, art)
    add_file(art, f"latency/light-{name}.json", light.read_text())
    run([*OFA, "report", "--artifact", str(art), "--target", f"light-{name}", "--out", str(out / f"report-{name}"),
         "--no-progress"], log)
    report = json.loads((out / f"report-{name}" / "report.json").read_text())
    shutil.rmtree(art)
    tables = {p.stem: json.loads(p.read_text())["fit"]["quality"]["held_out"] for p in (light, full)}
    served = [{k: s.get(k) for k in ("label", "id", "predicted_accuracy", "predicted_accuracy_low",
                                     "predicted_accuracy_high", "test_accuracy", "predicted_latency_ms",
                                     "raw_predicted_latency_ms", "measured_latency_ms")} for s in report["served"]]
    return {"light_profile_seconds": round(profile_s, 1), "light_summary": summary,
            "search_and_fetch_seconds": round(search_fetch_s, 2), "held_out": tables,
            "independent": json.loads(vs.read_text())["tables"], "served": served,
            "speed_sent": report["reference"]["speed_before"], "speed_after": report["reference"]["speed_after"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--client-venv", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--combo", action="append", help="RUNTIME:PRECISION (repeat)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint()
    (a.out / "space.json").write_text(load_artifact(a.artifact).space.to_json())
    combos = [c.split(":") for c in (a.combo or ["onnxruntime:fp32", "openvino:fp32", "onnxruntime:int8"])]
    kits = {}  # one per served format: an fp32 kit for every runtime, an int8 kit for its runtime's quantizer
    for rt, prec in combos:
        fmt = run_format(rt, prec)
        if fmt in kits:
            continue
        kits[fmt] = a.out / f"kit-{fmt}"
        t0 = time.perf_counter()
        run([*OFA, "profile", "--kit", str(kits[fmt]), "--artifact", str(a.artifact), "--precision", prec,
             "--backend", rt, "--no-progress"], a.out / "log.txt")
        print(f"kit {fmt}: {time.perf_counter() - t0:.0f} s, "
              f"{sum(f.stat().st_size for f in kits[fmt].rglob('*')) / 2**20:.0f} MiB", flush=True)
    venv_mb = sum(f.stat().st_size for f in a.client_venv.rglob("*") if f.is_file()) / 2**20
    results = {"fingerprint": fp, "client_venv_mib": round(venv_mb), "combos": {}}
    with ServerProcess([a.artifact], a.out / "server.log", extra=["--targets-dir", str(a.out / "targets")]) as srv:
        for rt, prec in combos:
            r = results["combos"][f"{rt}:{prec}"] = combo(rt, prec, a, a.out, kits[run_format(rt, prec)], srv)
            print(json.dumps({f"{rt}:{prec}": r}, indent=1), flush=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
