"""Do a target's references run slower while an idle ``ofa serve`` is up (issue 33)?

The demo re-times the references with its server up (and idle: ``ServerProcess.wait_idle``), searches, stops the
server, then times the served files with the references again. When the second timing ran ~2x faster than the
first, was that the machine, or the server's presence? This alternates the two states ``--repeats`` times, each
pass in a fresh timing worker by the table's own protocol (a pass with the server up starts it, waits for it to
be idle, times, stops it), and prints the median of measured/profiled over the references for each pass.

    cd benchmarks && ../.venv/bin/python server_beside.py --artifact A --target T [--repeats 4] [--json F]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from common import fingerprint, target_references
from ofa.jobs.service import ServerProcess
from ofa.predict.timing import export_folder, subnet_part, time_parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--json")
    a = p.parse_args()
    if a.repeats < 1:
        p.error(f"--repeats must be >= 1, got {a.repeats}")
    fp = fingerprint()
    space, refs, profiled, timing = target_references(a.artifact, a.target)
    parts = [subnet_part(space, x) for x in refs]
    out: dict[str, list[float]] = {"server_up": [], "server_down": []}
    with tempfile.TemporaryDirectory() as tmp, export_folder() as exported:
        for rep in range(a.repeats):
            for state in ("server_up", "server_down"):
                if state == "server_up":
                    with ServerProcess([Path(a.artifact)], Path(tmp) / "serve.log") as server:
                        said = server.wait_idle()
                        t = time_parts(space, parts, timing, exported=exported)
                else:
                    said, t = "", time_parts(space, parts, timing, exported=exported)
                ratio = t.ms / profiled
                out[state].append(round(float(np.median(ratio)), 4))
                print(f"pass {rep + 1}, {state}: references measured/profiled, median {np.median(ratio):.3f} "
                      f"(range {ratio.min():.3f}-{ratio.max():.3f}); {t.repeatability()['verdict']}"
                      + (f"; {said}" if said else ""), flush=True)
    up, down = np.array(out["server_up"]), np.array(out["server_down"])
    print(f"server up {np.median(up):.3f} (passes {up.min():.3f}-{up.max():.3f}) against server down "
          f"{np.median(down):.3f} ({down.min():.3f}-{down.max():.3f}); up/down per adjacent pair: "
          + ", ".join(f"{u / d:.3f}" for u, d in zip(up, down)))
    fingerprint()
    if a.json:
        Path(a.json).write_text(json.dumps({"fingerprint": fp, "passes": out}, indent=1))


if __name__ == "__main__":
    main()
