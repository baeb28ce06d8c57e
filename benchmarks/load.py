"""Load on `ofa serve`: N concurrent clients mixing searches and (cached) fetches for T seconds (issue 6).

Starts `ofa serve` on 127.0.0.1 (a port the OS picks) for the artifact, warms the weight
cache with a few subnets, then runs N client threads. Each thread alternates at random
between SearchSubnet (default settings: population 100 x 500 generations, a latency
bound drawn from the target's range) and GetSubnetWeights of one of the warmed subnets.
RESOURCE_EXHAUSTED is the server's deliberate answer beyond --max-searches concurrent
searches; a client then backs off 20-80 ms. Prints p50/p99 per RPC, requests/s, every
status seen and the server's peak resident memory (VmHWM).

    python benchmarks/load.py --artifact runs/fashion --target this-cpu [--clients 32] [--seconds 30]
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ofa_client import Client, ClientError, ResourceExhausted  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--search-share", type=float, default=0.5, help="share of calls that are searches")
    p.add_argument("--max-searches", type=int, default=2)
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()

    server = subprocess.Popen([sys.executable, "-m", "ofa", "serve", "--artifact", a.artifact, "--port", "0",
                               "--max-searches", str(a.max_searches), "--workers", str(max(16, a.clients + 4))],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        address = "127.0.0.1:" + line.split("127.0.0.1:")[1].split()[0]
        with Client(address) as c:
            front = c.pareto(a.target, points=6)
            lat = [s.predicted_latency_ms for s in front]
            warm = [s for s in front[:4]]
            for s in warm:
                c.fetch(s, "safetensors")
        lo, hi = min(lat), max(lat)
        print(f"server {address}; {len(warm)} subnets in the weight cache; latency bounds drawn from "
              f"[{lo:.2f}, {hi:.2f}] ms; {a.clients} clients for {a.seconds:.0f} s", flush=True)

        times: dict[str, list[float]] = collections.defaultdict(list)
        statuses: collections.Counter = collections.Counter()
        lock = threading.Lock()
        stop_at = time.perf_counter() + a.seconds

        def worker(i: int) -> None:
            rng = random.Random(i)
            with Client(address, timeout=60) as c:
                while time.perf_counter() < stop_at:
                    search = rng.random() < a.search_share
                    t = time.perf_counter()
                    try:
                        if search:
                            c.search(a.target, max_latency_ms=rng.uniform(lo, hi), seed=rng.randrange(1 << 30))
                        else:
                            c.fetch(rng.choice(warm), "safetensors")
                        status = "OK"
                    except ResourceExhausted:
                        status = "RESOURCE_EXHAUSTED"
                    except ClientError as e:
                        status = e.code
                    dt = time.perf_counter() - t
                    with lock:
                        statuses[("search" if search else "fetch", status)] += 1
                        if status == "OK":
                            times["SearchSubnet" if search else "GetSubnetWeights (cached)"].append(dt)
                    if status == "RESOURCE_EXHAUSTED":
                        time.sleep(rng.uniform(0.02, 0.08))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        peak = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(60)

    result = {"clients": a.clients, "seconds": round(wall, 1), "max_searches": a.max_searches, "rpcs": {},
              "statuses": {f"{k[0]} {k[1]}": v for k, v in sorted(statuses.items())},
              "server_peak_rss_mb": round(peak, 1)}
    print("\n| RPC | OK calls | p50 ms | p99 ms | OK calls/s |\n|---|---|---|---|---|")
    for name, ts in sorted(times.items()):
        ms = np.array(ts) * 1000
        row = {"ok": len(ts), "p50_ms": round(float(np.percentile(ms, 50)), 1),
               "p99_ms": round(float(np.percentile(ms, 99)), 1), "per_s": round(len(ts) / wall, 1)}
        result["rpcs"][name] = row
        print(f"| {name} | {row['ok']} | {row['p50_ms']} | {row['p99_ms']} | {row['per_s']} |")
    total = sum(statuses.values())
    errors = {k: v for k, v in result["statuses"].items() if not k.endswith(" OK") and "RESOURCE_EXHAUSTED" not in k}
    print(f"\nall calls: {total} in {wall:.1f} s ({total / wall:.0f}/s); statuses: {result['statuses']}")
    print(f"errors other than RESOURCE_EXHAUSTED: {sum(errors.values())} {errors or ''}")
    print(f"server peak resident memory: {peak:.0f} MiB")
    goals = result["rpcs"]
    if "GetSubnetWeights (cached)" in goals and "SearchSubnet" in goals:
        print(f"goals: cached fetch p99 {goals['GetSubnetWeights (cached)']['p99_ms']} ms (< 50), "
              f"search p99 {goals['SearchSubnet']['p99_ms']} ms (< 1000)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
