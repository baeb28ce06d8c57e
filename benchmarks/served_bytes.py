"""What a server answers for one artifact, as values to compare across two versions of the code.

Starts ``ofa serve`` on ``--artifact`` (a child process, 127.0.0.1, an OS-chosen port), runs a fixed
set of searches and a Pareto front, and fetches 4 archs (the searched ones, the space's smallest and
largest, and every subnet the artifact records fine-tuned) in every format the client knows. Writes
the answers and each file's sha256 as JSON; with ``--compare FILE`` prints which differ from FILE's.
A refactoring that moves code, not behaviour, answers the same values and the same bytes.

    cd benchmarks && ../.venv/bin/python served_bytes.py --artifact ../runs/x/supernet --out before.json
    ... change the code ...
    ../.venv/bin/python served_bytes.py --artifact ../runs/x/supernet --out after.json --compare before.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import fingerprint

from ofa.artifact import load_artifact, open_artifact
from ofa.jobs.service import ServerProcess
from ofa_client import FORMATS, Client



def _answer(info) -> dict:
    return {k: v for k, v in info.to_dict().items() if k != "search_seconds"}  # the one field that is a timing


def _searches(c: Client, target: str) -> dict:
    found = {}
    front = sorted(p.predicted_latency_ms for p in c.pareto(target, points=10, seed=1))
    for budget in front[:3]:  # a budget at each of the three fastest points of the front: three different answers
        budget = round(budget + 1e-3, 4)
        found[f"latency<={budget}"] = _answer(c.search(target, max_latency_ms=budget, seed=3))
    found["macs-only"] = _answer(c.search(max_macs=int(5e6), seed=5))
    found["min-accuracy"] = _answer(c.search(target, min_accuracy=75.0, seed=7))
    found["pareto"] = [_answer(p) for p in c.pareto(target, points=6, seed=11)]
    return found


def collect(artifact: Path) -> dict:
    art = load_artifact(artifact)
    tuned = sorted(open_artifact(artifact).finetuned())
    space = art.space
    with tempfile.TemporaryDirectory() as tmp, ServerProcess([artifact], Path(tmp) / "server.log") as srv:
        with Client(srv.address, timeout=600) as c:
            target = c.targets()[0]["name"]
            searches = _searches(c, target)
            archs = {"smallest": space.smallest().to_dict(), "largest": space.largest().to_dict(),
                     **{f"searched-{k}": v["arch"] for k, v in searches.items() if k.startswith("latency")}}
            archs.update({f"fine-tuned-{i}": {"id": i} for i in tuned})
            files = {}
            t0 = time.monotonic()
            for label, arch in archs.items():
                for fmt in sorted(FORMATS):
                    w = c.fetch(arch["id"] if set(arch) == {"id"} else arch, fmt)
                    files[f"{label}/{fmt}"] = {"sha256": w.sha256, "bytes": len(w.data), "fine_tuned": w.fine_tuned,
                                               "id": w.subnet_id}
            fetch_s = time.monotonic() - t0
    return {"artifact": str(artifact), "digest": art.digest, "target": target, "searches": searches,
            "files": files, "fetch_seconds": round(fetch_s, 1)}


def compare(now: dict, before: dict) -> int:
    differ = 0
    for part in ("searches", "files"):
        for key in sorted(set(now[part]) | set(before[part])):
            a, b = before[part].get(key), now[part].get(key)
            if a != b:
                differ += 1
                print(f"DIFFERENT {part} {key}:\n  before {json.dumps(a)[:300]}\n  now    {json.dumps(b)[:300]}")
    same = len(now["searches"]) + len(now["files"]) - differ
    print(f"{same} identical, {differ} different ({len(now['files'])} files, {len(now['searches'])} search answers)")
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--compare", type=Path, help="an earlier --out of this script: print what differs")
    a = p.parse_args()
    fingerprint()
    now = collect(a.artifact.resolve())
    a.out.write_text(json.dumps(now, indent=1, sort_keys=True))
    print(f"{len(now['files'])} files fetched in {now['fetch_seconds']} s; written to {a.out}")
    return compare(now, json.loads(a.compare.read_text())) if a.compare else 0


if __name__ == "__main__":
    sys.exit(main())
