"""``ofa search``, ``ofa pareto``, ``ofa profile``: the predictors used, and latency measured."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..artifact import MEASUREMENTS, latency_file, open_artifact
from .common import flag_errors

__all__ = ["add_search", "run_search", "add_pareto", "run_pareto", "add_profile", "run_profile"]


def _search_arguments(s: argparse.ArgumentParser, generations: int) -> None:
    s.add_argument("--artifact", required=True)
    s.add_argument("--target", help="hardware target with a latency table in the artifact (see `ofa info`)")
    s.add_argument("--max-latency-ms", type=float, help="upper bound on predicted latency on --target")
    s.add_argument("--max-macs", type=int, help="upper bound on multiply-accumulates")
    s.add_argument("--max-params", type=int, help="upper bound on parameters")
    s.add_argument("--resolution", type=int, action="append", help="allowed input resolution (repeatable)")
    s.add_argument("--min-accuracy", type=float,
                   help="floor on predicted accuracy: then minimise latency (MACs without --target)")
    s.add_argument("--population", type=int, default=100)
    s.add_argument("--generations", type=int, default=generations)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _constraints(args: argparse.Namespace):
    from ..search import Constraints

    return flag_errors(lambda: Constraints(max_latency_ms=args.max_latency_ms, max_macs=args.max_macs,
                                           max_params=args.max_params, resolutions=tuple(args.resolution or ()),
                                           min_accuracy=args.min_accuracy))


def _settings(args: argparse.Namespace):
    from ..search import SearchSettings

    settings = SearchSettings(population=args.population, generations=args.generations, seed=args.seed)
    flag_errors(settings.check)
    return settings


def _describe(c) -> str:
    lat = f"{c.latency_ms:.3f} ms, " if c.latency_ms is not None else ""
    acc = f"accuracy {c.accuracy:.2f}%"
    if c.accuracy_low is not None:
        acc += f" [{c.accuracy_low:.2f}, {c.accuracy_high:.2f}]"
    return (f"{c.arch.id}  {acc}  {lat}{c.macs / 1e6:.2f} MMACs  {c.params / 1e6:.3f} M params"
            + ("  (EXTRAPOLATED: outside the measured subnets)" if c.extrapolated else ""))


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    """Re-time a table's reference subnets on this device now; store the speed in the table."""
    from ..jobs.profile import recalibrate_table, table_to_recalibrate
    from ..predict.latency import Speed
    from ..predict.profile import reference_timings

    if args.table and (args.artifact or args.space):
        raise ValueError("--recalibrate takes --table FILE [--space-file F] or --artifact DIR --target NAME")
    if not args.table and not (args.artifact and args.target):
        raise ValueError("--recalibrate needs --table FILE, or --artifact DIR with --target NAME")
    if not (args.out or args.artifact or args.timings_out):
        raise ValueError("--recalibrate with --table writes nothing without --out FILE or --timings-out FILE")
    space, table = flag_errors(lambda: table_to_recalibrate(args.table, args.artifact, args.target, args.space_file))
    table, timings, written = recalibrate_table(space, table, not args.no_progress, args.accept_noisy_timing,
                                                args.out, args.artifact)
    recal = table["recalibration"]
    print(f"{len(recal['ratios'])} reference subnets re-timed in {timings.seconds:.1f} s: the device runs at "
          f"{Speed.from_dict(recal).describe()} of its profiled time now (ratios {min(recal['ratios']):.3f}-"
          f"{max(recal['ratios']):.3f}); {recal['repeatability']['verdict']}")
    if args.timings_out:
        Path(args.timings_out).write_text(json.dumps(reference_timings(space, table, timings), indent=1))
        print(f"wrote {args.timings_out} (send it with `ofa-client search --reference-timings {args.timings_out}`)")
    for path in written:
        print(f"wrote {path}")
    return 0


def add_search(s: argparse.ArgumentParser) -> None:
    _search_arguments(s, generations=500)


def run_search(args: argparse.Namespace) -> int:
    """Evolutionary search over the artifact's predictors."""
    from ..search import search
    from ..search.load import load_scorer

    scorer = load_scorer(args.artifact)
    result = search(scorer, _constraints(args), args.target, _settings(args))
    if args.json:
        print(json.dumps({**result.best.to_dict(), "search_seconds": round(result.seconds, 4),
                          "generations": result.generations, "evaluated": result.evaluated}, sort_keys=True))
        return 0
    print(_describe(result.best))
    print(f"  arch {result.best.arch}")
    print(f"  found in {result.seconds:.3f} s ({result.generations} generations, {result.evaluated} archs scored)")
    return 0


def add_pareto(s: argparse.ArgumentParser) -> None:
    _search_arguments(s, generations=100)
    s.add_argument("-k", type=int, default=10, help="number of budgets along the front (default 10)")
    s.add_argument("--plot", help="write the front and the measured subnets as a PNG here")


def run_pareto(args: argparse.Namespace) -> int:
    """The accuracy-latency (or -MACs) front."""
    from ..search import pareto_front
    from ..search.load import load_scorer

    files = open_artifact(args.artifact)
    scorer = load_scorer(files)
    t0 = time.perf_counter()
    front = pareto_front(scorer, args.k, args.target, _constraints(args), _settings(args))
    seconds = time.perf_counter() - t0
    if args.plot:
        from ..jobs.render import plot_pareto

        measured = files.read_json(MEASUREMENTS)["subnets"] if files.has(MEASUREMENTS) else None
        plot_pareto(front, args.plot, args.target, scorer, measured)
    if args.json:
        print(json.dumps({"front": [c.to_dict() for c in front], "seconds": round(seconds, 4)}, sort_keys=True))
        return 0
    for c in front:
        print(_describe(c))
    print(f"{len(front)} points in {seconds:.2f} s" + (f"; plot written to {args.plot}" if args.plot else ""))
    return 0


def add_profile(s: argparse.ArgumentParser) -> None:
    from ..predict.timing import BACKENDS

    s.add_argument("--artifact", help="artifact folder: its space is profiled and the table is stored "
                   f"as {latency_file('TARGET')} in it")
    s.add_argument("--space", help="profile a registered space instead (see `ofa spaces`)")
    s.add_argument("--space-file", help="profile the space defined in this JSON file instead (on a device: "
                   "`ofa-client supernets --json` gives it as space.definition_json)")
    s.add_argument("--target", help="name of this hardware target (letters, digits, -_.)")
    s.add_argument("--out", help="also write the table to this file")
    s.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                   help="onnxruntime (default): every network exported to ONNX as a fetched --format onnx subnet "
                   "is, run in an onnxruntime CPU session; openvino: the same ONNX files compiled by OpenVINO for "
                   "the CPU (latency hint, one stream; pip install openvino); torch: eager torch modules, which at "
                   "batch 1 on small images measures Python dispatch as much as the network")
    s.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="fp32 (default), or int8: every network statically quantized as the backend's served int8 "
                   "file is: onnxruntime's quantizer (--format onnx_int8) or, with --backend openvino, NNCF's "
                   "(--format openvino_int8; pip install nncf); the target then serves int8 files")
    s.add_argument("--threads", type=int, default=2, help="intra-op threads while timing (default 2)")
    s.add_argument("--batch", type=int, default=1, help="batch size while timing (default 1)")
    s.add_argument("--channels-last", action="store_true", help="time in channels_last memory format (torch only)")
    s.add_argument("--rounds", type=int, default=6, help="interleaved passes over all networks (default 6)")
    s.add_argument("--sample-ms", type=float, default=10.0,
                   help="each timing sample runs as many calls as fill this many ms (default 10)")
    s.add_argument("--warmup-ms", type=float, default=20.0,
                   help="each network runs this many ms (at least 3 calls) before its first timed pass (default 20)")
    s.add_argument("--subnets", type=int, default=80,
                   help="random subnets timed end to end besides the references, to fit and check the model "
                   "(default 80)")
    s.add_argument("--held-out", type=float, default=0.25,
                   help="share of those held out to check the model (default 0.25)")
    s.add_argument("--references", type=int, default=10,
                   help="reference subnets timed end to end, re-timed later by --recalibrate (default 10)")
    s.add_argument("--recalibrate", action="store_true",
                   help="re-time the references of --table FILE (or of --artifact DIR's --target) on this device "
                   "now and store the device's speed in the table (--out, or back into the artifact)")
    s.add_argument("--table", help="with --recalibrate: the latency table to re-time")
    s.add_argument("--accept-noisy-timing", action="store_true",
                   help="with --recalibrate: use the re-timing even when the protocol's repeatability check calls "
                   "it too noisy after two more tries with more rounds (its verdict is recorded); default: refuse")
    s.add_argument("--timings-out", help="with --recalibrate: also write the references' timings here, for "
                   "`ofa-client search --reference-timings FILE`")
    s.add_argument("--kit", metavar="DIR", help="instead of timing here: write into DIR the ONNX files and manifest a "
                   "device times with `ofa-client profile --kit DIR` (no torch there); --subnets, --held-out, "
                   "--references and --seed size it, --precision int8 quantizes it for --backend's runtime")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")


def _write_kit(args: argparse.Namespace) -> int:
    from ..jobs.profile import space_to_profile, write_kit
    from ..predict.profile import check_profile

    space = flag_errors(lambda: space_to_profile(args.artifact, args.space, args.space_file))
    flag_errors(lambda: check_profile(args.subnets, args.held_out, args.references))
    t0 = time.perf_counter()
    kit = flag_errors(lambda: write_kit(space, args.kit, args.subnets, args.held_out, args.references, args.seed,
                                        not args.no_progress, args.precision, args.backend))
    runtime = "" if args.precision == "fp32" else f" --runtime {args.backend}"
    print(f"wrote {args.kit}: {len(kit['entries'])} blocks and {len(kit['subnets'])} subnets of space "
          f"{space.name} as {kit['weights_format']} in {time.perf_counter() - t0:.0f} s; on the device: "
          f"ofa-client --address ADDRESS profile --kit {args.kit}{runtime} --target NAME")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    """Time every distinct block and subnets end to end on this machine into a latency table."""
    from ..predict.latency import check_target_name
    from ..jobs.profile import profile_target, space_to_profile
    from ..predict.profile import check_profile
    from ..predict.timing import Timing

    if args.recalibrate:
        return _cmd_recalibrate(args)
    if sum(map(bool, (args.artifact, args.space, args.space_file))) != 1:
        raise ValueError("give exactly one of --artifact DIR, --space NAME or --space-file FILE")
    if args.kit:
        return _write_kit(args)
    if not args.target:
        raise ValueError("--target is required: the name of this hardware target")
    space = flag_errors(lambda: space_to_profile(args.artifact, args.space, args.space_file))
    check_target_name(args.target)
    timing = Timing(backend=args.backend, threads=args.threads, batch=args.batch, channels_last=args.channels_last,
                    rounds=args.rounds, sample_ms=args.sample_ms, warmup_ms=args.warmup_ms,
                    precision=args.precision)
    flag_errors(timing.check)
    flag_errors(lambda: check_profile(args.subnets, args.held_out, args.references))
    table, written = profile_target(space, args.target, timing, args.subnets, args.held_out, args.references,
                                    args.seed, not args.no_progress, args.out, args.artifact)
    for path in written:
        print(f"wrote {path}")
    fit, rep = table["fit"], table["timing"]["repeatability"]
    held = fit["quality"].get("held_out") or {}
    print(f"{len(table['entries'])} blocks and {fit['subnets'] + fit['held_out']} subnets timed in "
          f"{table['profile_seconds']} s ({rep['verdict']}); model {table['model']['family']}, on "
          f"{held.get('subnets', 0)} held-out subnets: {held.get('within_10pct', float('nan')):.0%} within 10%, "
          f"mean |error| {held.get('mean_abs_rel_error', float('nan')):.1%}, Spearman {held.get('spearman', 0):.3f}")
    return 0
