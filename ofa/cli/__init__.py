"""The ``ofa`` command: a table of commands, each (name, help, add its arguments, run).

Library errors become exit codes here: 3 for constraints no subnet meets, 2 for a bad
input (a message naming the flag), 0 on success. Commands of other installed packages
join the table through the entry-point group ``ofa.commands`` (``ofa serve`` comes from
``ofa_server``, which the library itself never imports).
"""
from __future__ import annotations

import argparse
import signal
import sys
from importlib.metadata import entry_points

from . import finetune, info, make, search
from .common import Command

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

COMMANDS: tuple[Command, ...] = (
    Command("spaces", "list the registered search spaces",
            info.add_spaces, info.run_spaces),
    Command("demo", "the whole story: train, predict, profile, serve, specialise for 3 budgets",
            make.add_demo, make.run_demo,
            description="Train the quick supernet into OUT/supernet, measure subnets and fit the "
                       "accuracy predictor, profile this machine, start `ofa serve` on 127.0.0.1, request and "
                       "fetch the best subnet for a tight, a middle and a loose latency budget with "
                       "`ofa-client`, stop the server, measure the subnets here and write OUT/report.md, "
                       "OUT/report.json and OUT/pareto.png. Finished steps are reused when run again."),
    Command("report", "serve an artifact, specialise it for latency budgets, measure, report",
            make.add_report, make.run_report,
            description="Start `ofa serve` on 127.0.0.1 for --artifact, ask it through `ofa-client` "
                       "for the Pareto front and the best subnet under each latency budget, fetch them, stop "
                       "the server, measure test accuracy and latency here, and write report.md, report.json "
                       "and pareto.png into --out. --baseline W trains torchvision's mobilenet_v3_small xW from "
                       "scratch on the same data for the same epochs and compares at its measured latency."),
    Command("check", "build a supernet, extract three subnets, check costs and outputs",
            info.add_check, info.run_check),
    Command("train", "train a supernet with progressive shrinking",
            make.add_train, make.run_train,
            description="Train one supernet (full net, then elastic kernel, depth and "
                       "expand ratio with distillation) and write the artifact into --out. Runs "
                       "on one CPU or GPU, or under `torchrun --nproc_per_node N -m ofa train ...`."),
    Command("profile", "measure this machine's latency into a latency table, or re-time it",
            search.add_profile, search.run_profile,
            description="Time every distinct block configuration of a space (every kernel, expand ratio, "
                       "stage and resolution, plus stem and head) and subnets end to end on this machine, in a "
                       "timing process that imports only the runtime, and write a latency table (JSON, format "
                       "ofa-latency-table v2) whose model is fitted on most of those subnets and checked on the rest. "
                       "With --recalibrate, re-time a table's reference subnets instead (seconds) and store how much "
                       "faster or slower the device runs now."),
    Command("predictors", "measure subnets and fit the accuracy predictor into an artifact",
            make.add_predictors, make.run_predictors,
            description="Sample subnets stratified over MACs (corners included), re-calibrate "
                       "BN, measure validation accuracy, pick the predictor family by cross-validated "
                       "Kendall tau and store measurements and predictor in the artifact. Measurements "
                       "are kept: a later run measures only subnets not measured yet and fits on all. "
                       "The report includes the highest tau any predictor could expect against "
                       "measurements on a validation split of this size (from per-image correctness)."),
    Command("int8-accuracy", "measure what int8 quantization costs the served subnets' accuracy",
            make.add_int8_accuracy, make.run_int8_accuracy,
            description="Quantize measured subnets as a runtime's served int8 file is (onnx_int8: onnxruntime's "
                       "static quantizer; openvino_int8: NNCF's; both calibrated on the artifact's calibration "
                       "images), test them in that runtime on the validation images their fp32 accuracy was "
                       "measured on, and store the drop (a constant with its spread) in the artifact: for a target "
                       "of that runtime timed at int8, the server adds it to predicted accuracies and widens their "
                       "intervals."),
    Command("finetune", "fine-tune one subnet with distillation; the server then serves it",
            finetune.add_finetune, finetune.run_finetune, description=finetune.DESCRIPTION),
    Command("search", "find the most accurate subnet under constraints",
            search.add_search, search.run_search,
            description="Regularised evolution over the artifact's predictors. Exit code 3 "
                       "when the constraints cannot be met (the message gives the smallest achievable value)."),
    Command("pareto", "the accuracy-latency (or -MACs) front of an artifact",
            search.add_pareto, search.run_pareto),
    Command("info", "show what an artifact holds and how good its predictors are",
            info.add_info, info.run_info),
    Command("import-reference", "make an artifact (or safetensors file) from a reference OFAMobileNetV3 .pth",
            make.add_import_reference, make.run_import_reference),
)
PLUGINS = "ofa.commands"  # entry-point group: name -> a Command (e.g. serve = "ofa_server.command:COMMAND")


def _commands() -> list[Command]:
    """The table, with the commands of installed plug-ins after ``pareto`` (where ``serve`` belongs)."""
    plugins = [ep.load() for ep in sorted(entry_points(group=PLUGINS), key=lambda ep: ep.name)]
    at = next(i for i, c in enumerate(COMMANDS) if c.name == "pareto") + 1
    return [*COMMANDS[:at], *plugins, *COMMANDS[at:]]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``ofa``: one sub-parser per command of the table."""
    p = argparse.ArgumentParser(prog="ofa", description="Once-for-All supernets: train, predict, search, serve.")
    sub = p.add_subparsers(dest="command", required=True)
    for c in _commands():
        s = sub.add_parser(c.name, help=c.help, description=c.description)
        c.add_arguments(s)
        s.set_defaults(func=c.run)
    return p


def main(argv: list[str] | None = None) -> int:
    from ofa_client.flags import bounded

    from .common import configure_logging
    from ..predict.timing import NoisyTiming, TimingError
    from ..search import Infeasible

    try:
        from safetensors import SafetensorError
    except ImportError:  # a device that only profiles needs torch, numpy and tqdm alone
        SafetensorError = ValueError

    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return args.func(args)
    except Infeasible as e:
        print(f"ofa {args.command}: infeasible: {e}", file=sys.stderr)
        return 3
    except NoisyTiming as e:
        hint = ("; or pass --accept-noisy-timing to use the timing labelled as untrusted"
                if hasattr(args, "accept_noisy_timing") else "")
        print(f"ofa {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2
    except (ValueError, LookupError, OSError, SafetensorError, TimingError) as e:
        print(f"ofa {args.command}: error: {bounded(str(e), 2000)}", file=sys.stderr)  # said, never echoed whole
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or ofa serve's SIGTERM while it starts: one line, no traceback
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"ofa {args.command}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
