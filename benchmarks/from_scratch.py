"""The OFA claim, measured: a subnet taken out of the supernet vs the same arch trained alone.

For three archs (small, middle, large) of a trained artifact: (a) extract + BN
re-calibration, no re-training; (b) the same arch as a static network trained from
scratch on the same data, for the same total number of epochs as all phases of the
supernet's training together, with the full phase's lr, schedule and augmentation.
Both evaluated on the test split.

    python benchmarks/from_scratch.py --artifact runs/fashion [--epochs N] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from ofa.artifact import load_artifact
from ofa.data import augment, load_dataset, prepare_batch, split_validation
from ofa.evaluate import accuracy, subnet_accuracy
from ofa.subnet import build_subnet


def train_from_scratch(space, arch, train_set, spec, epochs: float, lr: float, cfg: dict, seed: int):
    torch.manual_seed(seed)
    net = build_subnet(space, arch).to(memory_format=torch.channels_last).train()
    decay = [p for p in net.parameters() if p.dim() > 1]
    no_decay = [p for p in net.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                          momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    bs = cfg["batch_size"]
    per_epoch = len(train_set) // bs
    total = max(1, round(epochs * per_epoch))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_set), generator=g)
    for step in range(total):
        b = step % per_epoch
        if b == 0 and step:
            order = torch.randperm(len(train_set), generator=g)
        idx = order[b * bs : (b + 1) * bs]
        x = prepare_batch(augment(train_set.images[idx], cfg["augment_padding"], cfg["augment_flip"]),
                          arch.resolution, spec)
        for group in opt.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(net(x), train_set.labels[idx], label_smoothing=cfg["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--epochs", type=float, help="default: the sum of the artifact's phase epochs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
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
    rows = []
    print(f"same total epochs: {epochs:g}; lr {cfg['phases'][0]['lr']}, batch {cfg['batch_size']}")
    for name, arch in archs.items():
        ofa_acc = subnet_accuracy(art.supernet, arch, art.calibration, test, spec)
        t = time.perf_counter()
        net = train_from_scratch(space, arch, train_set, spec, epochs, cfg["phases"][0]["lr"], cfg, cfg["seed"])
        scratch = accuracy(net, test, spec, arch.resolution)
        rows.append({"name": name, "arch": arch.to_dict(), "ofa": ofa_acc, "scratch": scratch,
                     "scratch_seconds": time.perf_counter() - t})
        print(f"{name:7s} {arch}  OFA (extracted) {ofa_acc:6.2f}%  from scratch {scratch:6.2f}%  "
              f"({rows[-1]['scratch_seconds']:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"epochs": epochs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
