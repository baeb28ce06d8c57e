"""``ofa train``, ``import-reference``, ``predictors``, ``demo``, ``report``: the commands that make artifacts and reports."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..artifact import ACCURACY_PREDICTOR, MEASUREMENTS, METRICS_LOG
from ..space import DEFAULT_SPACE
from .common import flag_errors

__all__ = ["add_train", "run_train", "add_import_reference", "run_import_reference", "add_predictors", "run_predictors", "add_demo", "run_demo", "add_report", "run_report", "add_int8_accuracy", "run_int8_accuracy"]


def _print_table(report: dict) -> None:
    from ..jobs.render import table_rows

    print("\n".join(table_rows(report)))


def add_train(s: argparse.ArgumentParser) -> None:
    from ..train.config import PRESETS

    s.add_argument("--out", required=True, help=f"artifact folder (checkpoints and {METRICS_LOG} go there too)")
    s.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: the demo (~6 min on 2 CPU cores); fashion: the quality run (35-55 min "
                   "on 2 CPU cores); cifar10; imagenet: the reference recipe (GPUs; its ImageFolder data is streamed "
                   "through DataLoader workers, see data_mode); transfer: two short phases for a run that starts "
                   "from an existing supernet (--init-from). Default: quick")
    s.add_argument("--config", help="JSON file of config keys to override (same keys as --set)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. batch_size=64 or phases.kernel.epochs=2 (repeatable)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    s.add_argument("--phase", help="run only this phase of the preset's (full, kernel, depth-1, depth-2, expand-1, "
                   "expand-2; transfer: full, elastic), from "
                   "the checkpoint the phase before it left (kept in checkpoints/after-PHASE/); its "
                   "settings and later phases' may differ from that run's")
    s.add_argument("--dataset", help="fashion-mnist, cifar10 or imagefolder (default: the preset's)")
    s.add_argument("--data-dir", dest="data_dir", help="where the dataset lies (default: Debian's Fashion-MNIST)")
    s.add_argument("--space", help=f"search space (default {DEFAULT_SPACE}; see `ofa spaces`)")
    s.add_argument("--init-from", dest="init_from", metavar="SUPERNET",
                   help="start from this supernet: an artifact folder or a reference OFAMobileNetV3 checkpoint (.pth) "
                   "of the same space (--space; the data's channels, classes and resolutions may differ): its weights "
                   "are copied, the classifier (and the first conv, for another channel count) made fresh. "
                   "Use with --preset transfer")
    s.add_argument("--seed", type=int)
    s.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_train(args: argparse.Namespace) -> int:
    """Progressive shrinking into an artifact directory."""
    from ..data import DataError
    from ..train import load_config, train

    assignments = list(args.set or [])
    for flag in ("space", "dataset", "data_dir", "init_from", "seed", "device", "threads"):
        value = getattr(args, flag)
        if value is not None:
            assignments.append(f"{flag}={value}")
    config = load_config(args.preset, args.config, assignments)
    t0 = time.perf_counter()
    results = flag_errors(lambda: train(config, args.out, resume=args.resume, only_phase=args.phase,
                                        progress=not args.no_progress), errors=DataError)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": args.out, "seconds": round(time.perf_counter() - t0, 1),
                          "val_accuracy": results}, indent=1))
    return 0


def add_import_reference(s: argparse.ArgumentParser) -> None:
    from ..reference import REFERENCE_SPACES

    s.add_argument("--checkpoint", required=True, help="the reference checkpoint (OFAMobileNetV3 state_dict .pth)")
    s.add_argument("--out", required=True,
                   help="the artifact folder to write (weights, space, ImageNet's data description, manifest; "
                   "the calibration set and accuracy predictor when given); a FILE.safetensors writes the weights "
                   "alone")
    s.add_argument("--space", choices=REFERENCE_SPACES,
                   help="the reference space (default: the one whose widths the checkpoint has)")
    s.add_argument("--calib-dir",
                   help="a folder of training images (ImageFolder's CLASS/*.jpg, or any tree): --calib-images of "
                   "them, drawn with --seed and cropped as the reference's training transform, become the "
                   "calibration set the server re-calibrates BatchNorm on; without it `ofa serve` refuses the "
                   "artifact")
    s.add_argument("--calib-images", type=int, default=2000,
                   help="calibration images to draw (default 2000, as the reference calibrates)")
    s.add_argument("--accuracy-predictor",
                   help="the reference's pretrained accuracy predictor (.pth, its 3x400 MLP), stored as the "
                   "artifact's predictor")
    s.add_argument("--seed", type=int, default=0)


def run_import_reference(args: argparse.Namespace) -> int:
    """A reference OFAMobileNetV3 checkpoint as an artifact (or, --out FILE.safetensors, its weights alone)."""
    from ..jobs.import_reference import import_reference, import_weights
    from ..space import get_space

    def run() -> dict:
        space = get_space(args.space) if args.space else None
        if args.out.endswith(".safetensors"):
            return import_weights(args.checkpoint, args.out, space)
        return import_reference(args.checkpoint, args.out, space, args.calib_dir, args.calib_images, args.seed,
                                args.accuracy_predictor)

    summary = flag_errors(run)
    print(json.dumps(summary, indent=1))
    if args.calib_dir is None and not args.out.endswith(".safetensors"):
        print("note: no --calib-dir, so the artifact has no calibration set: `ofa profile` can time it, `ofa serve` "
              "refuses it until you run this again with --calib-dir TRAIN_IMAGES", file=sys.stderr)
    return 0


def _families_flag(s: argparse.ArgumentParser) -> None:
    from ..predict.accuracy import FAMILIES

    s.add_argument("--families", type=lambda v: [f for f in v.replace(",", " ").split() if f],
                   help="accuracy predictor families to choose from by cross-validation, comma-separated "
                   f"(default: all of {', '.join(FAMILIES)}; the MLPs take most of the fitting time)")


def _noisy_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--accept-noisy-timing", action="store_true",
                   help="use a latency timing that the protocol's repeatability check calls too noisy even after "
                   "two more tries with more rounds, labelled as untrusted in the report (default: stop and say so)")


def add_predictors(s: argparse.ArgumentParser) -> None:
    s.add_argument("--artifact", required=True)
    s.add_argument("--samples", type=int, default=300,
                   help="subnets to measure (default 300, at least 10); random ones are added when the split by "
                   "arch id would leave fewer than 10 to fit or 2 held out")
    s.add_argument("--front", type=int, default=0,
                   help="of the samples, this many are taken along the front the search would pick from (two rounds, "
                   "each after a fit on what is measured so far), where the predictor's errors matter; default 0")
    s.add_argument("--front-target",
                   help="take the --front samples along this latency target's front (the artifact's table; where "
                   "the subnets served for it come from) instead of the accuracy-MACs front")
    s.add_argument("--loop-rounds", type=int, default=0,
                   help="closed loop (needs --front-target): after the fit, measure the subnets the search would serve "
                   "for --loop-budgets budgets along the target's front, refit, and repeat until their measurements "
                   "lie in their predicted intervals or this many rounds ran (default 0: no loop)")
    s.add_argument("--loop-budgets", type=int, default=5,
                   help="latency budgets per closed-loop round, spread as `ofa report` spreads them (default 5)")
    s.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of subnets held out for the reported quality (default 0.2)")
    s.add_argument("--calib-images", type=int, help="BN calibration images per subnet (default: all stored)")
    s.add_argument("--data-dir", help="where the training dataset lies, if not where training found it")
    s.add_argument("--plot", help="write a predicted-vs-measured plot (PNG) of the held-out subnets here")
    _families_flag(s)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print the quality report as JSON")


def run_predictors(args: argparse.Namespace) -> int:
    """Measure subnets of an artifact, pick and fit the accuracy predictor, store both in it."""
    import torch

    from ..jobs.predictors import build_accuracy_predictor, check_predictor_settings

    flag_errors(lambda: check_predictor_settings(args.samples, args.test_fraction, args.front, args.families,
                                                 args.loop_rounds, args.loop_budgets, args.front_target))
    if args.threads:
        torch.set_num_threads(args.threads)  # this process's own setting: the command ends with it
    report = build_accuracy_predictor(args.artifact, samples=args.samples, seed=args.seed,
                                      test_fraction=args.test_fraction, calib_images=args.calib_images,
                                      data_dir=args.data_dir, front=args.front, front_target=args.front_target,
                                      loop_rounds=args.loop_rounds, loop_budgets=args.loop_budgets,
                                      families=args.families, progress=not args.no_progress,
                                      log=(lambda s: None) if args.json else print)
    if args.plot:
        from ..jobs.render import plot_predicted_vs_measured

        held = report["held_out"]
        plot_predicted_vs_measured(held["measured"], held["predicted"], args.plot,
                                   f"accuracy predictor ({report['selected']}), held-out subnets: "
                                   f"tau {report['test']['kendall_tau']:.3f}, RMSE {report['test']['rmse']:.2f}")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "held_out"}, indent=1, sort_keys=True))
    else:
        for row in report["learning_curve"]:
            print(f"  fitted on {row['train_samples']:4d}: held-out tau {row['kendall_tau']:.3f}, "
                  f"RMSE {row['rmse']:.3f}")
        print(f"measured in {report['measure_seconds']} s; stored {MEASUREMENTS} and "
              f"{ACCURACY_PREDICTOR} in {args.artifact}")
    return 0


def add_demo(s: argparse.ArgumentParser) -> None:
    from ..predict.timing import BACKENDS
    from ..train.config import PRESETS

    s.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    s.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="training preset (default quick)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training config value")
    s.add_argument("--samples", type=int, default=40, help="subnets measured for the accuracy predictor (default 40)")
    s.add_argument("--front", type=int, default=16,
                   help="of them, this many along the front the search picks from (default 16; see ofa predictors)")
    s.add_argument("--loop-rounds", type=int, default=2,
                   help="closed-loop rounds after the fit: measure what the search would serve, refit (default 2; "
                   "see ofa predictors)")
    s.add_argument("--loop-budgets", type=int, default=5, help="budgets per closed-loop round (default 5)")
    s.add_argument("--seed", type=int, default=0,
                   help="seeds the training (and its validation split) and the predictor's samples (default 0)")
    _noisy_flag(s)
    _families_flag(s)
    s.add_argument("--target", default="this-machine", help="name for this machine's latency target")
    s.add_argument("--budgets", type=int, default=3, help="latency budgets along the front (default 3)")
    s.add_argument("--profile-backend", choices=BACKENDS, default="onnxruntime",
                   help="runtime of this machine's latency target (default onnxruntime; see `ofa profile --help`)")
    s.add_argument("--profile-rounds", type=int, default=6, help="interleaved timing passes (default 6)")
    s.add_argument("--profile-sample-ms", type=float, default=10.0,
                   help="each timing sample runs as many calls as fill this many ms (default 10)")
    s.add_argument("--profile-warmup-ms", type=float, default=20.0,
                   help="each network runs this many ms before its first timed pass (default 20)")
    s.add_argument("--profile-subnets", type=int, default=50,
                   help="random subnets timed end to end to fit and check the latency model (default 50)")
    s.add_argument("--no-progress", action="store_true")


def run_demo(args: argparse.Namespace) -> int:
    """Train, fit predictors, profile, serve, specialise through ofa-client, measure, report."""
    from ..jobs import demo
    from ..predict.timing import Timing

    t0 = time.perf_counter()
    timing = Timing(backend=args.profile_backend, rounds=args.profile_rounds, sample_ms=args.profile_sample_ms,
                    warmup_ms=args.profile_warmup_ms)
    flag_errors(timing.check, prefix="--profile-")
    flag_errors(lambda: demo.check_demo(args.samples, args.target, timing, args.profile_subnets, args.budgets,
                                    args.front, args.families, args.loop_rounds, args.loop_budgets))
    report = demo.run_demo(args.out, args.preset, args.set or [], args.samples, args.target, timing,
                           args.profile_subnets, args.budgets, args.front, progress=not args.no_progress, log=print,
                           command=f"ofa demo --out {Path(args.out)}" + (f" --seed {args.seed}" if args.seed else ""),
                           families=args.families, loop_rounds=args.loop_rounds, loop_budgets=args.loop_budgets,
                           seed=args.seed, accept_noisy=args.accept_noisy_timing)
    print()
    _print_table(report)
    print(f"\nreport: {Path(args.out) / 'report.md'}; Pareto plot: {Path(args.out) / 'pareto.png'}; "
          f"total {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def add_report(s: argparse.ArgumentParser) -> None:
    s.add_argument("--artifact", required=True, help="artifact with an accuracy predictor and --target's table")
    s.add_argument("--target", required=True, help="latency target of the artifact, profiled on this machine")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--budgets", type=int, default=3, help="latency budgets spread along the front (default 3)")
    s.add_argument("--budget-ms", type=float, action="append", help="an explicit latency budget (repeatable)")
    s.add_argument("--baseline", type=float, action="append", metavar="WIDTH",
                   help="also train mobilenet_v3_small with this width multiplier as a baseline (repeatable)")
    s.add_argument("--baseline-epochs", type=float, help="default: all of the artifact's training epochs")
    s.add_argument("--data-dir", help="where the dataset lies, if not where training found it")
    _noisy_flag(s)
    s.add_argument("--no-progress", action="store_true")


def run_report(args: argparse.Namespace) -> int:
    """Serve an artifact, specialise it for latency budgets through ofa-client, measure, report."""
    from ..jobs import report as job

    flag_errors(lambda: job.check_report_settings(args.budgets, args.budget_ms or ()))
    report = job.run_report(args.artifact, args.target, args.out, args.budgets, args.budget_ms or (),
                            args.baseline or (), args.baseline_epochs, args.data_dir, progress=not args.no_progress,
                            log=print, accept_noisy=args.accept_noisy_timing)
    command = "ofa report " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["report"] else None
    job.write_report(report, args.out, command)
    print()
    _print_table(report)
    print(f"\nreport: {Path(args.out) / 'report.md'}; Pareto plot: {Path(args.out) / 'pareto.png'}")
    return 0


def add_int8_accuracy(s: argparse.ArgumentParser) -> None:
    from ..predict.timing import ONNX_BACKENDS

    s.add_argument("--artifact", required=True, help="artifact with measured subnets (`ofa predictors`)")
    s.add_argument("--subnets", type=int, default=24, help="measured subnets to quantize and test (default 24)")
    s.add_argument("--data-dir", help="where the dataset lies, if not where training found it")
    s.add_argument("--backend", choices=ONNX_BACKENDS, default=ONNX_BACKENDS[0],
                   help="the runtime whose served int8 file is tested, run there: onnxruntime (default; onnx_int8, "
                   "onnxruntime's quantizer) or openvino (openvino_int8, NNCF's; pip install nncf). Each is stored "
                   "apart and applies to the int8 targets of its runtime")


def run_int8_accuracy(args: argparse.Namespace) -> int:
    """Measure what int8 costs the served subnets; int8 targets' predictions then carry it."""
    from ..jobs.precision import measure_int8

    r = flag_errors(lambda: measure_int8(args.artifact, args.subnets, args.data_dir, log=print, runtime=args.backend))
    print(f"{r['format']} on {r['subnets']} subnets ({r['val_images']} validation images): "
          f"mean drop {r['mean_drop']:+.3f} "
          f"points, spread (sd) {r['sd']:.3f}, correlation with MACs {r['macs_correlation']}; {r['seconds']} s. "
          f"Stored in the artifact: the {args.backend} int8 targets' predictions add the drop and widen by the spread")
    return 0
