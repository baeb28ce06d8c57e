"""``ofa finetune``: train one served subnet a few more epochs with distillation and record it in the artifact."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..artifact import FINETUNED_DIR, MEASUREMENTS, finetuned_file, open_artifact
from .common import flag_errors

__all__ = ["DESCRIPTION", "add_finetune", "run_finetune"]

DESCRIPTION = ("Train one subnet of --artifact (given by --arch, or by --id: an id of the artifact's measured or "
               "fine-tuned subnets, or its smallest or largest) for --epochs more epochs on the training split the "
               "artifact was trained on (the validation split stays held out), distilling from the supernet's "
               "largest subnet at the same resolution, starting from the subnet as served (BN re-calibrated) and "
               "re-calibrating BN on the served images after. Writes --out (the served subnet file format, its "
               "metadata saying fine-tuned: epochs, settings, accuracies) and records it in the artifact as "
               f"{FINETUNED_DIR}ID.safetensors: `ofa serve` started on the artifact serves it for that arch (and says "
               "fine_tuned). Prints a JSON summary: validation and test accuracy before and after, steps, "
               "seconds. An artifact imported from a reference checkpoint records no training split and is refused.")


def add_finetune(s: argparse.ArgumentParser) -> None:
    from ..jobs.finetune import DEFAULTS

    s.add_argument("--artifact", required=True, help="the artifact folder (fine-tuned file recorded in it)")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="the subnet as JSON (kernel, expand, depth, resolution), or @FILE")
    which.add_argument("--id", help="a subnet id the artifact knows (measured, fine-tuned, smallest, largest)")
    s.add_argument("--epochs", type=int, required=True, help="epochs over the training split (>= 1)")
    s.add_argument("--out", required=True, help="the fine-tuned subnet file to write (safetensors)")
    s.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                   help="peak learning rate (warm-up over a tenth of an epoch, then cosine to zero)")
    s.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    s.add_argument("--kd-ratio", type=float, default=DEFAULTS["kd_ratio"],
                   help="weight of the distillation loss added to the label loss, 0..1 (0: labels only)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    s.add_argument("--data-dir", help="where the training dataset is, if not where training found it")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _arch(args: argparse.Namespace):
    """The arch of --arch or --id; an id the artifact does not know is refused, telling to pass --arch."""
    from ..export import finetuned_archs
    from ..space import Arch

    files = open_artifact(args.artifact)
    space = files.space()
    if args.arch:
        text = Path(args.arch[1:]).read_text() if args.arch.startswith("@") else args.arch
        return flag_errors(lambda: space.arch_from_json(text), prefix="--arch ")
    known = {a.id: a for a in (space.smallest(), space.largest())}
    if files.has(MEASUREMENTS):
        known.update((i, Arch.from_dict(m["arch"])) for i, m in files.read_json(MEASUREMENTS)["subnets"].items())
    known.update(finetuned_archs(files))
    if args.id not in known:
        raise LookupError(f"--id {args.id!r} is not a subnet this artifact knows (its measured or fine-tuned "
                          "subnets, smallest, largest): pass the subnet with --arch JSON")
    return known[args.id]


def run_finetune(args: argparse.Namespace) -> int:
    from ..jobs.finetune import finetune, record_finetuned

    arch = _arch(args)
    module, report = flag_errors(lambda: finetune(
        args.artifact, arch, args.epochs, lr=args.lr, batch_size=args.batch_size, kd_ratio=args.kd_ratio,
        seed=args.seed, threads=args.threads or None, data_dir=args.data_dir, progress=not args.no_progress))
    data = record_finetuned(args.artifact, module, report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(json.dumps({**report, "out": str(out), "bytes": len(data), "recorded_as": finetuned_file(arch.id)},
                     sort_keys=True))
    return 0
