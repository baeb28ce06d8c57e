"""The OFA claim, measured: a subnet taken out of the supernet vs the same arch trained alone.

For three archs (small, middle, large) of a trained artifact: (a) extract + BN
re-calibration, no re-training; (b) the same arch as a static network trained from
scratch on the same data, for the same total number of epochs as all phases of the
supernet's training together, with the full phase's lr, warm-up and augmentation and a cosine schedule
(`ofa.jobs.scratch`).
Both evaluated on the test split. Training from scratch takes most of the time (over an
hour here); ``--scratch-json`` reuses the from-scratch figures of an earlier run's
``--json`` for archs it holds (the same arch ids), so a new artifact of the same space is
compared in a minute, and the table says how many epochs the reused figures had.

    python benchmarks/from_scratch.py --artifact runs/fashion [--epochs N] [--json FILE]
                                      [--scratch-json EARLIER.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from ofa.artifact import load_artifact
from ofa.data import load_dataset, split_validation
from ofa.evaluate import accuracy, subnet_accuracy
from ofa.space import Arch
from ofa.jobs.scratch import train_from_scratch
from ofa.subnet import build_subnet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--epochs", type=float, help="default: the sum of the artifact's phase epochs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--scratch-json", help="reuse the from-scratch results of an earlier --json for the same archs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    art = load_artifact(a.artifact)
    cfg = art.manifest["training"]
    epochs = a.epochs or sum(ph["epochs"] for ph in cfg["phases"])
    full, spec = load_dataset(cfg["dataset"], cfg["data_dir"] or None, True, cfg["image_size"])
    train_set, _ = split_validation(full, cfg["val_size"], cfg["seed"])
    test, _ = load_dataset(cfg["dataset"], cfg["data_dir"] or None, False, cfg["image_size"])
    space = art.space
    mid_res = space.resolutions[len(space.resolutions) // 2]
    archs = {"small": space.smallest(mid_res),
             "middle": space.sample(7, resolution=mid_res),
             "large": space.largest(mid_res)}
    earlier = {}
    if a.scratch_json:
        with open(a.scratch_json) as f:
            old = json.load(f)
        earlier = {Arch.from_dict(r["arch"]).id: {**r, "scratch_epochs": r.get("scratch_epochs", old["epochs"])}
                   for r in old["rows"]}
    rows = []
    print(f"supernet epochs (all phases): {epochs:g}; lr {cfg['phases'][0]['lr']}, batch {cfg['batch_size']}")
    for name, arch in archs.items():
        ofa_acc = subnet_accuracy(art.supernet, arch, art.calibration, test, spec)
        if arch.id in earlier:
            prev = earlier[arch.id]
            scratch, seconds, scratch_epochs = prev["scratch"], prev["scratch_seconds"], prev["scratch_epochs"]
        else:
            torch.manual_seed(cfg["seed"])
            net, stats = train_from_scratch(build_subnet(space, arch), arch.resolution, train_set, spec, cfg, epochs,
                                            cfg["seed"], desc=f"{name} from scratch")
            scratch, seconds, scratch_epochs = accuracy(net, test, spec, arch.resolution), stats["seconds"], epochs
        rows.append({"name": name, "arch": arch.to_dict(), "ofa": ofa_acc, "scratch": scratch,
                     "scratch_seconds": seconds, "scratch_epochs": scratch_epochs})
        print(f"{name:7s} {arch}  OFA (extracted) {ofa_acc:6.2f}%  from scratch {scratch:6.2f}% "
              f"({scratch_epochs:g} epochs{', reused' if arch.id in earlier else ''}, {seconds:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"epochs": epochs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
