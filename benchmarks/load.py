"""Load on `ofa serve`: N concurrent clients mixing searches and (cached) fetches for T seconds (issue 6).

Starts `ofa serve` on 127.0.0.1 (a port the OS picks) for the artifact, warms the weight
cache with a few subnets, then runs N clients as threads spread over --procs client
processes (one Python process would make the load generator's own GIL part of every
latency). Each call is, at random, a SearchSubnet (default settings: population 100 x 500
generations, a latency bound drawn from the target's range) or a GetSubnetWeights of one
of the warmed subnets.

Two ways to load the server:
- closed loop (default, --rate 0): every client calls again as soon as its call returns.
  This finds the capacity; latencies then are queueing (Little's law: clients / rate).
- open loop (--rate R): calls arrive at R per second in all (Poisson, spread over the
  clients), as independent pipelines would send them. Each call starts when it is due,
  on its client's channel, even while that client's previous call is still running;
  its latency counts from when it was due, so a server that falls behind is charged for
  the wait (no coordinated omission). With --serial-clients a client makes one call at a
  time instead, so a call due during the same client's previous call (a 130 ms search,
  say) waits for it and is charged that wait too: that measures the clients' own
  queueing as well as the server.

Before loading, one client alone measures what each RPC costs in CPU seconds of the
server and the client together; with C cores that bounds the closed-loop rate, and the
report prints the measured rate against that bound. RESOURCE_EXHAUSTED is the server's
deliberate answer beyond --max-searches concurrent searches; a closed-loop client then
backs off 20-80 ms. Prints p50/p99 per RPC, calls/s, every status seen and the server's
peak resident memory (VmHWM, its search workers included).

    python benchmarks/load.py --artifact runs/fashion --target this-cpu [--clients 32] [--seconds 30] \\
        [--rate R [--serial-clients]] [--search-niceness N] [--busy K [--busy-nice M]]

``--busy K`` runs K busy loops (at ``--busy-nice``, default 0: a compile job) beside the server while it is loaded:
a shared machine. ``--search-niceness`` is the server's flag.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import multiprocessing as mp
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import busy_loops, fingerprint  # noqa: E402

from ofa_client import Client, ClientError, ResourceExhausted  # noqa: E402

FETCH, SEARCH = "GetSubnetWeights (cached)", "SearchSubnet"


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the server's search workers); threads come and go while listed."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process plus its children's (the server's search workers):
    the sum of the peaks, so at least the peak of the sum."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:  # a child that ended meanwhile
            continue
        total += next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), 0.0)
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its children (the server's search workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        kids = children(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(map(cpu_seconds, kids))


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def call(c: Client, search: bool, rng: random.Random, job: dict) -> str:
    try:
        if search:
            c.search(job["target"], max_latency_ms=rng.uniform(job["lo"], job["hi"]), seed=rng.randrange(1 << 30))
        else:
            c.fetch(rng.choice(job["warm"]), "safetensors")
        return "OK"
    except ResourceExhausted:
        return "RESOURCE_EXHAUSTED"
    except ClientError as e:
        return e.code


def client_process(job: dict, first: int, count: int, queue: mp.Queue, ready, go, start_at) -> None:
    """``count`` clients; puts (rpc, status, seconds from due, seconds late to start) of every call on ``queue``."""
    records: list[tuple[str, str, float, float]] = []
    lock = threading.Lock()
    ready.wait()  # every process has imported grpc: now the parent sets the start
    go.wait()
    start = start_at.value
    stop = start + job["seconds"]
    per_client = job["rate"] / job["clients"]

    def timed(c: Client, search: bool, rng: random.Random, due: float) -> str:
        late = time.perf_counter() - due
        status = call(c, search, rng, job)
        with lock:
            records.append(("search" if search else "fetch", status, time.perf_counter() - due, late))
        return status

    def serial(i: int) -> None:  # closed loop, or --serial-clients: one call at a time per client
        rng = random.Random(i)
        due = start + (rng.expovariate(per_client) if per_client else 0.0)
        with Client(job["address"], timeout=60) as c:
            while due < stop:
                if per_client:
                    time.sleep(max(0.0, due - time.perf_counter()))
                else:
                    due = time.perf_counter()
                status = timed(c, rng.random() < job["search_share"], rng, due)
                if per_client:
                    due += rng.expovariate(per_client)
                elif status == "RESOURCE_EXHAUSTED":
                    time.sleep(rng.uniform(0.02, 0.08))
                    due = time.perf_counter()
                else:
                    due = time.perf_counter()

    def independent() -> None:  # open loop: every call starts when due, whatever is still in flight
        clients = [Client(job["address"], timeout=60) for _ in range(count)]
        calls = []  # (due, client, search, rng of its own)
        for k in range(count):
            rng = random.Random(first + k)
            due = start + rng.expovariate(per_client)
            while due < stop:
                calls.append((due, k, rng.random() < job["search_share"], random.Random(rng.randrange(1 << 30))))
                due += rng.expovariate(per_client)
        calls.sort(key=lambda t: t[0])
        # enough threads that a call never waits for one (the 'late' figure shows it if it does)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4 * count) as pool:
            futures = []
            for due, k, search, rng in calls:
                time.sleep(max(0.0, due - time.perf_counter()))
                futures.append(pool.submit(timed, clients[k], search, rng, due))
        for f in futures:
            f.result()  # a failure of the load generator itself is raised, not lost
        for c in clients:
            c.close()

    time.sleep(max(0.0, start - time.perf_counter()))
    if per_client and not job["serial_clients"]:
        independent()
    else:
        threads = [threading.Thread(target=serial, args=(first + k,)) for k in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    queue.put(records)


def cost_alone(address: str, job: dict, server_pid: int, n: int = 12) -> dict[str, float]:
    """CPU seconds (server + this client) and wall seconds per call, one call at a time."""
    rng = random.Random(12345)
    out = {}
    with Client(address, timeout=60) as c:
        for rpc, search in ((FETCH, False), (SEARCH, True)):
            cpu0, own0, t0 = cpu_seconds(server_pid), own_cpu_seconds(), time.perf_counter()
            for _ in range(n):
                call(c, search, rng, job)
            wall = (time.perf_counter() - t0) / n
            cpu = (cpu_seconds(server_pid) - cpu0 + own_cpu_seconds() - own0) / n
            out[rpc] = {"cpu_s": cpu, "wall_s": wall}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--procs", type=int, default=4, help="client processes the clients are spread over")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=0.0,
                   help="calls per second offered in all, Poisson (0: closed loop, as fast as answered)")
    p.add_argument("--serial-clients", action="store_true",
                   help="open loop: each client waits for its previous call before starting the next")
    p.add_argument("--search-share", type=float, default=0.5, help="share of calls that are searches")
    p.add_argument("--max-searches", type=int, default=2)
    p.add_argument("--search-niceness", type=int, help="ofa serve --search-niceness (default: the server's)")
    p.add_argument("--busy", type=int, default=0, help="busy loops beside the server while it is loaded")
    p.add_argument("--busy-nice", type=int, default=0, help="the busy loops' nice value")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()
    for name, ok in (("--clients", a.clients >= 1), ("--procs", a.procs >= 1), ("--seconds", a.seconds > 0),
                     ("--rate", a.rate >= 0), ("--search-share", 0 <= a.search_share <= 1),
                     ("--max-searches", a.max_searches >= 1), ("--busy", a.busy >= 0),
                     ("--busy-nice", 0 <= a.busy_nice <= 19)):
        if not ok:
            p.error(f"{name} is out of range: clients, procs, max-searches >= 1; seconds > 0; rate, busy >= 0; "
                    "search-share in [0, 1]; busy-nice in 0..19 (a lower one needs root)")
    procs = max(1, min(a.procs, a.clients))
    fingerprint()

    server = subprocess.Popen([sys.executable, "-m", "ofa", "serve", "--artifact", a.artifact, "--port", "0",
                               "--max-searches", str(a.max_searches), "--workers", str(max(16, a.clients + 4)),
                               *([] if a.search_niceness is None else ["--search-niceness", str(a.search_niceness)])],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        address = "127.0.0.1:" + line.split("127.0.0.1:")[1].split()[0]
        with Client(address) as c:
            front = c.pareto(a.target, points=6)
            warm = [s for s in front[:4]]
            for s in warm:
                c.fetch(s, "safetensors")
        lat = [s.predicted_latency_ms for s in front]
        job = {"address": address, "target": a.target, "lo": min(lat), "hi": max(lat), "warm": warm,
               "clients": a.clients, "seconds": a.seconds, "rate": a.rate, "search_share": a.search_share,
               "serial_clients": a.serial_clients}
        alone = cost_alone(address, job, server.pid)
        cores = len(os.sched_getaffinity(0))
        mean_cpu = a.search_share * alone[SEARCH]["cpu_s"] + (1 - a.search_share) * alone[FETCH]["cpu_s"]
        bound = cores / mean_cpu
        mode = (f"open loop, {a.rate:g} calls/s offered"
                + (", one call at a time per client" if a.serial_clients else ", calls independent")
                if a.rate else "closed loop")
        print(f"server {address}; {len(warm)} subnets in the weight cache; latency bounds drawn from "
              f"[{job['lo']:.2f}, {job['hi']:.2f}] ms; {a.clients} clients in {procs} processes for "
              f"{a.seconds:.0f} s, {mode}", flush=True)
        for rpc, c in alone.items():
            print(f"alone: {rpc} {c['wall_s'] * 1000:.1f} ms wall, {c['cpu_s'] * 1000:.1f} ms CPU (server + client)")
        print(f"CPU bound on the rate of this mix with {cores} cores: {bound:.1f} calls/s"
              + (f" (offered: {a.rate / bound:.0%} of it)" if a.rate else ""), flush=True)

        ctx = mp.get_context("spawn")  # gRPC's threads do not survive a fork
        queue: mp.Queue = ctx.Queue()
        ready, go, start_at = ctx.Barrier(procs + 1), ctx.Barrier(procs + 1), ctx.Value("d", 0.0)
        shares = [a.clients // procs + (k < a.clients % procs) for k in range(procs)]
        workers = [ctx.Process(target=client_process, args=(job, sum(shares[:k]), n, queue, ready, go, start_at))
                   for k, n in enumerate(shares)]
        for w in workers:
            w.start()
        ready.wait()
        with busy_loops(a.busy, a.busy_nice):
            start_at.value = time.perf_counter() + 0.2  # CLOCK_MONOTONIC: the same clock in every process
            go.wait()
            records = [r for _ in workers for r in queue.get()]
            wall = time.perf_counter() - start_at.value  # to the last call's end: calls may finish after --seconds
        for w in workers:
            w.join()
        peak = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(60)

    times: dict[str, list[float]] = collections.defaultdict(list)
    statuses: collections.Counter = collections.Counter()
    late: dict[str, list[float]] = collections.defaultdict(list)
    for kind, status, dt, started_late in records:
        statuses[(kind, status)] += 1
        late[kind].append(started_late)
        if status == "OK":
            times[SEARCH if kind == "search" else FETCH].append(dt)
    result = {"clients": a.clients, "procs": procs, "seconds": wall, "rate_offered": a.rate,
              "serial_clients": a.serial_clients, "search_niceness": a.search_niceness, "busy": a.busy,
              "busy_nice": a.busy_nice,
              "max_searches": a.max_searches, "alone": alone, "cpu_bound_per_s": round(bound, 1), "rpcs": {},
              "statuses": {f"{k[0]} {k[1]}": v for k, v in sorted(statuses.items())},
              "server_peak_rss_mb": round(peak, 1)}
    print("\n| RPC | OK calls | p50 ms | p90 ms | p99 ms | max ms | OK calls/s |\n|---|---|---|---|---|---|---|")
    for name, ts in sorted(times.items()):
        ms = np.array(ts) * 1000
        row = {"ok": len(ts), **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 90, 99)},
               "max_ms": round(float(ms.max()), 1), "per_s": round(len(ts) / wall, 1)}
        result["rpcs"][name] = row
        print(f"| {name} | {row['ok']} | {row['p50_ms']} | {row['p90_ms']} | {row['p99_ms']} | {row['max_ms']} "
              f"| {row['per_s']} |")
    if a.rate:
        print("calls started late (after they were due), ms: "
              + ", ".join(f"{kind} p99 {np.percentile(v, 99) * 1000:.1f} max {max(v) * 1000:.1f}"
                          for kind, v in sorted(late.items())))
        result["started_late_ms"] = {kind: {"p99": round(float(np.percentile(v, 99)) * 1000, 1),
                                            "max": round(max(v) * 1000, 1)} for kind, v in sorted(late.items())}
    total = sum(statuses.values())
    ok = sum(v for k, v in statuses.items() if k[1] == "OK")
    errors = {k: v for k, v in result["statuses"].items() if not k.endswith(" OK") and "RESOURCE_EXHAUSTED" not in k}
    print(f"\nall calls: {total} in {wall:.0f} s ({total / wall:.0f}/s); statuses: {result['statuses']}")
    used = sum(len(ts) * alone[name]["cpu_s"] for name, ts in times.items())
    result["cpu_share_of_ok_calls"] = round(used / (cores * wall), 3)
    print(f"OK calls/s {ok / wall:.1f}; at their cost alone they would take {used:.1f} of the {cores * wall:.0f} "
          f"core-seconds ({used / (cores * wall):.0%}); the rest went to refusals, contention and waiting")
    print(f"errors other than RESOURCE_EXHAUSTED: {sum(errors.values())} {errors or ''}")
    print(f"server peak resident memory (with its search workers): {peak:.0f} MiB")
    goals = result["rpcs"]
    if FETCH in goals and SEARCH in goals:
        print(f"goals: cached fetch p99 {goals[FETCH]['p99_ms']} ms (< 50), "
              f"search p99 {goals[SEARCH]['p99_ms']} ms (< 1000)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
