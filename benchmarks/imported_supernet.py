"""Serve an imported reference supernet (issue 23): build the artifact, profile the ImageNet space,
search, fetch, and the latency of served subnets against the prediction.

The pretrained checkpoints cannot be downloaded here, so a random-initialised reference
``OFAMobileNetV3`` (and accuracy predictor), saved by the reference package itself, stands in:
nothing timed depends on the weights' values. The calibration folder is Fashion-MNIST's
training images written as 320x256 RGB JPEGs (ImageNet's are ~400x350), one folder per class.

Prints the machine fingerprint first, then: time to build the artifact (decode + crop of the
calibration images, weights), to profile the space (blocks/s, total; or ``--table FILE`` reuses a
table profiled before), search time (latency and MACs budgets), fetch time of the largest subnet
(cold: BN re-calibration on every calibration image and the ONNX export; then from the cache),
and the onnxruntime latency of the largest and smallest subnets at 224 and 160 px, timed in the
same passes as the table's references, against the table's prediction at the speed the
references show now and as profiled.

    python benchmarks/imported_supernet.py [--width 1.0] [--calib-images 2000] [--table FILE]
        [--out DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import fingerprint, run_reference
from ofa.artifact import add_file, latency_file, load_artifact
from ofa.jobs.service import ServerProcess
from ofa.predict.latency import LatencyPredictor
from ofa.predict.profile import speed_of, timing_of_table
from ofa.predict.timing import subnet_part, time_parts
from ofa.jobs.import_reference import import_reference
from ofa_client import Client

TARGET = "this-machine"


def calibration_folder(root: Path, count: int) -> float:
    """``count`` Fashion-MNIST training images as 320x256 RGB JPEGs in CLASS/ folders; the seconds it took."""
    from PIL import Image

    from ofa.data import load_dataset

    t = time.perf_counter()
    ds, spec = load_dataset("fashion-mnist")
    for i in range(count):
        c = spec.class_names[int(ds.labels[i])].replace("/", "-")
        (root / c).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(ds.images[i, 0].numpy()).convert("RGB").resize((320, 256), Image.BILINEAR)
        img.save(root / c / f"{i}.jpg", quality=90)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0, choices=(1.0, 1.2))
    p.add_argument("--calib-images", type=int, default=2000)
    p.add_argument("--table", help="a latency table of this space profiled before (skips the profile)")
    p.add_argument("--out", help="work folder (default: a temporary one)")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()
    fig: dict = {"fingerprint": fingerprint()}
    out = Path(a.out or tempfile.mkdtemp(prefix="imported-"))
    out.mkdir(parents=True, exist_ok=True)
    ckpt, pred_file, art_dir = out / "ckpt.pth", out / "acc_predictor.pth", out / "artifact"
    run_reference("random_checkpoint", width=a.width, checkpoint=str(ckpt), predictor=str(pred_file))
    if not (out / "train").exists():
        print(f"writing {a.calib_images} calibration JPEGs: {calibration_folder(out / 'train', a.calib_images):.0f} s")
    summary = import_reference(ckpt, art_dir, calib_dir=out / "train", calib_images=a.calib_images,
                               accuracy_predictor=pred_file)
    fig["build_seconds"] = summary["seconds"]
    print(f"artifact built in {summary['seconds']:.1f} s ({summary['space']}, {summary['calibration_images']} "
          f"calibration images at 224 px)", flush=True)

    if a.table:
        add_file(art_dir, latency_file(TARGET), Path(a.table).read_text())
        table = json.loads(Path(a.table).read_text())
    else:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ofa", "profile", "--artifact", str(art_dir), "--target", TARGET,
                        "--no-progress"], check=True)
        wall = time.perf_counter() - t
        table = load_artifact(art_dir).files.read_json(latency_file(TARGET))
        nets = len(table["entries"]) + len(table["references"]) + table["fit"]["subnets"] + table["fit"]["held_out"]
        nets -= len(table["references"])  # the references are among the fit's subnets
        fig["profile"] = {"wall_seconds": round(wall, 1), "timing_seconds": table["profile_seconds"],
                          "blocks": len(table["entries"]), "networks": nets,
                          "networks_per_second": round(nets / wall, 2),
                          "held_out": table["fit"]["quality"].get("held_out")}
        print(f"profiled {len(table['entries'])} blocks and {nets - len(table['entries'])} subnets in {wall:.0f} s "
              f"({nets / wall:.1f} networks/s)", flush=True)
    art = load_artifact(art_dir)
    space = art.space
    archs = {f"{kind}@{r}": getattr(space, kind)(r) for r in (224, 160) for kind in ("largest", "smallest")}

    with ServerProcess([art_dir], out / "server.log") as server, Client(server.address, timeout=1800) as c:
        searches = {}
        for label, kwargs in (("latency", {"target": TARGET, "max_latency_ms": 15.0}),
                              ("macs", {"max_macs": 300_000_000})):
            t = time.perf_counter()
            best = c.search(**kwargs)
            searches[label] = {"wall_seconds": round(time.perf_counter() - t, 3),
                               "search_seconds": round(best.search_seconds, 3), "macs": best.macs}
        fig["search"] = searches
        print(f"search: {json.dumps(searches)}", flush=True)
        files, fetches = {}, {}
        for label, arch in archs.items():
            t = time.perf_counter()
            w = c.fetch(arch.to_dict(), "onnx")
            fetches[label] = round(time.perf_counter() - t, 2)
            files[label] = w.save(out / f"{label}.onnx")
        t = time.perf_counter()
        c.fetch(archs["largest@224"].to_dict(), "onnx")
        fetches["largest@224 again (cached)"] = round(time.perf_counter() - t, 3)
        fig["fetch_seconds"] = fetches
        print(f"fetch (ONNX, cold: calibration + export): {json.dumps(fetches)}", flush=True)

    pred = LatencyPredictor(space, table)
    refs = pred.references
    parts = [subnet_part(space, archs[k], str(files[k])) for k in archs] + [subnet_part(space, r) for r, _ in refs]
    timings = time_parts(space, parts, timing_of_table(table), progress=False)
    measured = timings.ms[: len(archs)]
    _, speed = speed_of(timings.ms[len(archs):], np.array([ms for _, ms in refs]))
    codes = space.encode(list(archs.values()))
    at_speed, raw = pred.with_speed(speed)(codes), pred.with_speed(type(speed)())(codes)
    rows = {}
    print(f"latency, onnxruntime, {timing_of_table(table).threads} threads, batch 1 (speed now {speed.describe()}):")
    for (label, arch), m, ps, pr in zip(archs.items(), measured, at_speed, raw):
        rows[label] = {"macs": int(space_macs(space, arch)), "measured_ms": round(float(m), 3),
                       "predicted_ms": round(float(ps), 3), "error": round(float(ps / m - 1), 4),
                       "predicted_as_profiled_ms": round(float(pr), 3), "raw_error": round(float(pr / m - 1), 4)}
        print(f"  {label:14s} measured {m:8.3f} ms  predicted {ps:8.3f} ms ({ps / m - 1:+.1%})  as profiled "
              f"{pr:8.3f} ms ({pr / m - 1:+.1%})")
    fig["latency"] = {"speed": speed.to_dict(), "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=1))


def space_macs(space, arch) -> int:
    from ofa.predict.cost import CostModel

    return int(CostModel(space).macs(space.encode([arch]))[0])


if __name__ == "__main__":
    main()
