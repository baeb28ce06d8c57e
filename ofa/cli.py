"""The ``ofa`` command."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_SPACE = "mbv3-small-images"


def _cmd_spaces(args: argparse.Namespace) -> int:
    from .space import get_space, space_names

    spaces = [get_space(n) for n in space_names()]
    if args.json:
        print(json.dumps([s.to_dict() for s in spaces], indent=2))
        return 0
    for s in spaces:
        print(f"{s.name}: {s.description}")
        print(f"  input {s.in_channels}x{{{','.join(map(str, s.resolutions))}}}px, "
              f"{s.num_classes} classes, {s.size():.3g} subnets")
        print(f"  kernel {list(s.kernel_choices)}, expand {list(s.expand_choices)}, "
              f"depth {list(s.depth_choices)}")
        for i, st in enumerate(s.stages):
            print(f"  stage {i + 1}: width {st.width:4d}  stride {st.stride}  {st.act:7s} "
                  f"{'SE' if st.se else ''}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Build a supernet, extract three subnets, print and check their cost and outputs."""
    import torch

    from .predict import CostModel, count_macs_params
    from .space import get_space
    from .supernet import Supernet, extract

    torch.manual_seed(args.seed)
    space = get_space(args.space)
    cost = CostModel(space)
    t0 = time.perf_counter()
    net = Supernet(space).eval()
    print(f"supernet for {space.name}: {sum(p.numel() for p in net.parameters()):,} parameters, "
          f"{space.size():.3g} subnets ({(time.perf_counter() - t0) * 1000:.0f} ms)")
    archs = {"smallest": space.smallest(), "random": space.sample(args.seed), "largest": space.largest()}
    print(f"{'subnet':9s} {'arch id':16s} {'res':>4s} {'MACs':>12s} {'params':>10s} "
          f"{'extract':>8s} {'max |Δlogit|':>12s}  arch")
    failures = 0
    for label, arch in archs.items():
        t = time.perf_counter()
        sub = extract(net, arch)
        t_extract = time.perf_counter() - t
        shape = (space.in_channels, arch.resolution, arch.resolution)
        macs, params = cost.arch_macs(arch), cost.arch_params(arch)
        counted = count_macs_params(sub, shape)
        x = torch.randn(4, *shape)
        with torch.no_grad():
            diff = (net(x, arch) - sub(x)).abs().max().item()
        ok = counted == (macs, params) and diff <= 1e-5
        failures += not ok
        print(f"{label:9s} {arch.id:16s} {arch.resolution:4d} {macs:12,d} {params:10,d} "
              f"{t_extract * 1000:6.1f}ms {diff:12.2e}  {arch}{'' if ok else '  MISMATCH'}")
    print("all checks passed: analytic MACs/params equal counted ones, subnet logits equal "
          "the supernet's" if not failures else f"{failures} subnet(s) failed their checks")
    return 1 if failures else 0


def _print_table(report: dict) -> None:
    from .report import table_rows

    print("\n".join(table_rows(report)))


def _cmd_demo(args: argparse.Namespace) -> int:
    """Train, fit predictors, profile, serve, specialise through ofa-client, measure, report."""
    from .demo import check_demo, run_demo
    from .predict.timing import Timing

    t0 = time.perf_counter()
    timing = Timing(backend=args.profile_backend, rounds=args.profile_rounds, sample_ms=args.profile_sample_ms)
    _flag_errors(timing.check, prefix="--profile-")
    _flag_errors(lambda: check_demo(args.samples, args.target, timing, args.profile_subnets, args.budgets,
                                    args.front))
    report = run_demo(args.out, args.preset, args.set or [], args.samples, args.target, timing, args.profile_subnets,
                      args.budgets, args.front, progress=not args.no_progress, log=print)
    print()
    _print_table(report)
    print(f"\nreport: {Path(args.out) / 'report.md'}; Pareto plot: {Path(args.out) / 'pareto.png'}; "
          f"total {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Serve an artifact, specialise it for latency budgets through ofa-client, measure, report."""
    from .report import render_markdown, run_report

    from .report import check_report_settings

    _flag_errors(lambda: check_report_settings(args.budgets, args.budget_ms or ()))
    report = run_report(args.artifact, args.target, args.out, args.budgets, args.budget_ms or (), args.baseline or (),
                        args.baseline_epochs, args.data_dir, progress=not args.no_progress, log=print)
    command = "ofa report " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["report"] else None
    (Path(args.out) / "report.md").write_text(render_markdown(report, command))
    print()
    _print_table(report)
    print(f"\nreport: {Path(args.out) / 'report.md'}; Pareto plot: {Path(args.out) / 'pareto.png'}")
    return 0


def _cmd_import_reference(args: argparse.Namespace) -> int:
    """Convert a reference OFAMobileNetV3 checkpoint into our safetensors layout."""
    import torch
    from safetensors.torch import save_file

    from .reference import load_reference_state_dict
    from .space import get_space
    from .supernet import Supernet

    # weights_only=True: tensors and containers only, no arbitrary objects are built.
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    net = load_reference_state_dict(Supernet(get_space(args.space)), ckpt)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, args.out, metadata={"space": args.space})
    print(f"wrote {args.out}: {len(state)} tensors for space {args.space}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Progressive shrinking into an artifact directory."""
    import logging

    from .train import load_config, train

    assignments = list(args.set or [])
    for flag in ("space", "dataset", "data_dir", "seed", "device", "threads"):
        value = getattr(args, flag)
        if value is not None:
            assignments.append(f"{flag}={value}")
    config = load_config(args.preset, args.config, assignments)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    results = train(config, args.out, resume=args.resume, only_phase=args.phase,
                    progress=not args.no_progress)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": args.out, "seconds": round(time.perf_counter() - t0, 1),
                          "val_accuracy": results}, indent=1))
    return 0


def _profile_space(args: argparse.Namespace):
    from .space import SearchSpace, get_space

    if args.space_file:
        try:
            return SearchSpace.from_dict(json.loads(Path(args.space_file).read_text()))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--space-file {args.space_file} is not a search-space definition: {e}") from None
    if args.artifact:
        if not (Path(args.artifact) / "manifest.json").exists():
            raise ValueError(f"{args.artifact} is not an artifact: manifest.json is missing")
        return SearchSpace.from_dict(json.loads((Path(args.artifact) / "space.json").read_text()))
    return get_space(args.space)


def _write_table(args: argparse.Namespace, space, table: dict) -> None:
    from .predict.latency import validate_table

    text = json.dumps(validate_table(table, space), indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    if args.artifact:
        from .artifact import add_file

        name = f"latency/{table['target']}.json"
        print(f"wrote {add_file(Path(args.artifact), name, text)}")


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    """Re-time a table's reference subnets on this device now; store the speed in the table."""
    from .predict.latency import Speed, validate_table
    from .predict.profile import recalibrate, reference_timings

    if args.table:
        if args.artifact or args.space:
            raise ValueError("--recalibrate takes --table FILE [--space-file F] or --artifact DIR --target NAME")
        table = json.loads(Path(args.table).read_text())
        space = _profile_space(args) if args.space_file else None
        if space is None:
            from .space import get_space, space_names

            name = table.get("space", {}).get("name")
            if name not in space_names():
                raise ValueError(f"the table's space {name!r} is not registered here; give its --space-file")
            space = get_space(name)
    elif args.artifact and args.target:
        space = _profile_space(args)
        path = Path(args.artifact) / "latency" / f"{args.target}.json"
        if not path.exists():
            raise ValueError(f"{args.artifact} has no latency table for --target {args.target!r}; profile it first")
        table = json.loads(path.read_text())
    else:
        raise ValueError("--recalibrate needs --table FILE, or --artifact DIR with --target NAME")
    if not (args.out or args.artifact or args.timings_out):
        raise ValueError("--recalibrate with --table writes nothing without --out FILE or --timings-out FILE")
    table = validate_table(table, space)
    table, timings = recalibrate(space, table, progress=not args.no_progress)
    recal = table["recalibration"]
    print(f"{len(recal['ratios'])} reference subnets re-timed in {timings.seconds:.1f} s: the device runs at "
          f"{Speed.from_dict(recal).describe()} of its profiled time now (ratios {min(recal['ratios']):.3f}-"
          f"{max(recal['ratios']):.3f}); {recal['repeatability']['verdict']}")
    if args.timings_out:
        Path(args.timings_out).write_text(json.dumps(reference_timings(space, table, timings), indent=1))
        print(f"wrote {args.timings_out} (send it with `ofa-client search --reference-timings {args.timings_out}`)")
    if args.out or args.artifact:
        _write_table(args, space, table)
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    """Time every distinct block and subnets end to end on this machine into a latency table."""
    from .predict.latency import check_target_name
    from .predict.profile import check_profile, profile_space
    from .predict.timing import Timing

    if args.recalibrate:
        return _cmd_recalibrate(args)
    if sum(map(bool, (args.artifact, args.space, args.space_file))) != 1:
        raise ValueError("give exactly one of --artifact DIR, --space NAME or --space-file FILE")
    if not args.target:
        raise ValueError("--target is required: the name of this hardware target")
    space = _profile_space(args)
    check_target_name(args.target)
    timing = Timing(backend=args.backend, threads=args.threads, batch=args.batch, channels_last=args.channels_last,
                    rounds=args.rounds, sample_ms=args.sample_ms)
    _flag_errors(timing.check)
    _flag_errors(lambda: check_profile(args.subnets, args.held_out, args.references))
    table = profile_space(space, args.target, timing, subnets=args.subnets, held_out=args.held_out,
                          references=args.references, seed=args.seed, progress=not args.no_progress)
    _write_table(args, space, table)
    fit, rep = table["fit"], table["timing"]["repeatability"]
    held = fit["quality"].get("held_out") or {}
    print(f"{len(table['entries'])} blocks and {fit['subnets'] + fit['held_out']} subnets timed in "
          f"{table['profile_seconds']} s ({rep['verdict']}); model {table['model']['family']}, on "
          f"{held.get('subnets', 0)} held-out subnets: {held.get('within_10pct', float('nan')):.0%} within 10%, "
          f"mean |error| {held.get('mean_abs_rel_error', float('nan')):.1%}, Spearman {held.get('spearman', 0):.3f}")
    return 0


def _flag_errors(make, prefix: str = "--"):
    """Run ``make``; a ValueError that starts with a field's name (``sample_ms must be…``) is re-worded to name
    its flag (``--sample-ms must be…``): library messages name fields, the CLI's name flags."""
    try:
        return make()
    except ValueError as e:
        text = str(e)
        field, _, rest = text.partition(" ")
        if field.isidentifier() and field.islower() and field not in ("the", "a", "an", "this") and rest:
            raise ValueError(f"{prefix}{field.replace('_', '-')} {rest}") from None
        raise


def _cmd_info(args: argparse.Namespace) -> int:
    """What an artifact holds: space, data, training figures, latency targets."""
    from .predict.latency import Speed, validate_table

    root = Path(args.artifact)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except OSError:
        raise ValueError(f"{root} is not an artifact: manifest.json is missing") from None
    targets = {}
    for name in sorted(manifest.get("files", {})):
        if name.startswith("latency/") and name.endswith(".json"):
            target = name[len("latency/"):-len(".json")]
            try:
                table = validate_table(json.loads((root / name).read_text()))
            except (OSError, ValueError) as e:  # shown, not fatal: the other targets are still of use
                targets[target] = {"error": str(e)}
                continue
            targets[table["target"]] = {"device": table["device"], "blocks": len(table["entries"]),
                                        "model": table["model"], "fit": table.get("fit"),
                                        "timing": table.get("timing"), "recalibration": table.get("recalibration"),
                                        "references": len(table.get("references", []))}
    accuracy = None
    if "accuracy_predictor.safetensors" in manifest.get("files", {}):
        from .predict.accuracy import AccuracyPredictor

        pred = AccuracyPredictor.from_bytes((root / "accuracy_predictor.safetensors").read_bytes())
        accuracy = {"family": pred.family, **{k: pred.info.get(k) for k in
                                              ("test", "train_samples", "test_samples", "learning_curve",
                                               "calib_images")}}
    info = {"artifact": str(root), "digest": manifest["digest"], "space": manifest["space"],
            "dataset": manifest["dataset"], "created": manifest["created"],
            "val_accuracy": manifest.get("metrics", {}).get("val_accuracy", {}), "targets": targets,
            "accuracy_predictor": accuracy}
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
        return 0
    print(f"artifact {root}  (digest {info['digest'][:16]}, created {info['created']})")
    print(f"space {info['space']}, trained on {info['dataset']}")
    order = [p["name"] for p in manifest.get("training", {}).get("phases", [])]
    for phase in sorted(info["val_accuracy"], key=lambda p: order.index(p) if p in order else len(order)):
        accs = info["val_accuracy"][phase]
        if not accs:  # evaluate_phases "last": the earlier phases were not evaluated
            continue
        print(f"  val. accuracy after {phase:9s} " + "  ".join(
            f"{k} {accs[k]:.2f}%" for k in ("smallest", "middle-1", "middle-2", "largest") if k in accs))
    if accuracy is None:
        print("accuracy predictor: none (run ofa predictors --artifact ...)")
    else:
        test = accuracy["test"] or {}
        print(f"accuracy predictor: {accuracy['family']}, fitted on {accuracy['train_samples']} measured "
              f"subnets; on {accuracy['test_samples']} held out: Kendall tau {test.get('kendall_tau', float('nan')):.3f}, "
              f"RMSE {test.get('rmse', float('nan')):.3f} points")
        if "tau_ceiling" in test:
            print(f"  the validation split's noise lets any predictor reach at most tau {test['tau_ceiling']:.3f} "
                  f"on these subnets")
    print(f"latency targets: {', '.join(targets) or 'none (run ofa profile --artifact ...)'}")
    for name, t in targets.items():
        if "error" in t:
            print(f"  {name}: not usable: {t['error']}")
            continue
        held = ((t.get("fit") or {}).get("quality") or {}).get("held_out") or {}
        rep = (t.get("timing") or {}).get("repeatability") or {}
        print(f"  {name}: {t['blocks']} blocks, {t['device'].get('cpu')}, {t['device'].get('threads')} threads, "
              f"{t['device'].get('backend')} {t['device'].get('backend_version', '')}; model {t['model']['family']}")
        print(f"    end to end on {held.get('subnets', 0)} held-out subnets: {held.get('within_10pct', float('nan')):.0%}"
              f" within 10%, mean |error| {held.get('mean_abs_rel_error', float('nan')):.1%}, Spearman "
              f"{held.get('spearman', float('nan')):.3f}; timing: {rep.get('verdict', 'not recorded')}")
        recal = t.get("recalibration")
        print(f"    speed: {Speed.from_dict(recal).describe()} of the profiled time, measured {recal.get('measured_at', '?')} "
              f"from {len(recal.get('ratios', []))} references" if recal else
              f"    speed: as profiled ({t['references']} references to re-time with `ofa profile --recalibrate`)")
    return 0


def _cmd_predictors(args: argparse.Namespace) -> int:
    """Measure subnets of an artifact, pick and fit the accuracy predictor, store both in it."""
    import torch

    from .predict.measure import build_accuracy_predictor, check_predictor_settings

    _flag_errors(lambda: check_predictor_settings(args.samples, args.test_fraction, args.front))
    if args.threads:
        torch.set_num_threads(args.threads)
    report = build_accuracy_predictor(args.artifact, samples=args.samples, seed=args.seed,
                                      test_fraction=args.test_fraction, calib_images=args.calib_images,
                                      data_dir=args.data_dir, front=args.front, front_target=args.front_target,
                                      progress=not args.no_progress, log=(lambda s: None) if args.json else print)
    if args.plot:
        from .plots import plot_predicted_vs_measured

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
        print(f"measured in {report['measure_seconds']} s; stored accuracy/measurements.json and "
              f"accuracy_predictor.safetensors in {args.artifact}")
    return 0


def _constraints(args: argparse.Namespace):
    from .search import Constraints

    return Constraints(max_latency_ms=args.max_latency_ms, max_macs=args.max_macs, max_params=args.max_params,
                       resolutions=tuple(args.resolution or ()), min_accuracy=args.min_accuracy)


def _settings(args: argparse.Namespace):
    from .search import SearchSettings

    return SearchSettings(population=args.population, generations=args.generations, seed=args.seed)


def _describe(c) -> str:
    lat = f"{c.latency_ms:.3f} ms, " if c.latency_ms is not None else ""
    return f"{c.arch.id}  accuracy {c.accuracy:.2f}%  {lat}{c.macs / 1e6:.2f} MMACs  {c.params / 1e6:.3f} M params"


def _cmd_search(args: argparse.Namespace) -> int:
    """Evolutionary search over the artifact's predictors."""
    from .search import search
    from .search.load import load_scorer

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


def _cmd_pareto(args: argparse.Namespace) -> int:
    """The accuracy-latency (or -MACs) front."""
    from .search import SearchSettings, pareto_front
    from .search.load import load_scorer

    scorer = load_scorer(args.artifact)
    t0 = time.perf_counter()
    front = pareto_front(scorer, args.k, args.target, _constraints(args),
                         SearchSettings(population=args.population, generations=args.generations, seed=args.seed))
    seconds = time.perf_counter() - t0
    if args.plot:
        from .plots import plot_pareto

        plot_pareto(front, args.plot, args.target, Path(args.artifact))
    if args.json:
        print(json.dumps({"front": [c.to_dict() for c in front], "seconds": round(seconds, 4)}, sort_keys=True))
        return 0
    for c in front:
        print(_describe(c))
    print(f"{len(front)} points in {seconds:.2f} s" + (f"; plot written to {args.plot}" if args.plot else ""))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ofa_server.main import serve  # grpc, torch and the artifacts load only for this command

    return serve(args)


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


def build_parser() -> argparse.ArgumentParser:
    from .space import space_names

    p = argparse.ArgumentParser(prog="ofa", description="Once-for-All supernets: train, predict, search, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("spaces", help="list the registered search spaces")
    s.add_argument("--json", action="store_true", help="print the full space descriptions as JSON")
    s.set_defaults(func=_cmd_spaces)

    from .train.config import PRESETS

    s = sub.add_parser("demo", help="the whole story: train, predict, profile, serve, specialise for 3 budgets",
                       description="Train the quick supernet into OUT/supernet, measure subnets and fit the "
                       "accuracy predictor, profile this machine, start `ofa serve` on 127.0.0.1, request and "
                       "fetch the best subnet for a tight, a middle and a loose latency budget with "
                       "`ofa-client`, stop the server, measure the subnets here and write OUT/report.md, "
                       "OUT/report.json and OUT/pareto.png. Finished steps are reused when run again.")
    s.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    s.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="training preset (default quick)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training config value")
    s.add_argument("--samples", type=int, default=40, help="subnets measured for the accuracy predictor (default 40)")
    s.add_argument("--front", type=int, default=16,
                   help="of them, this many along the front the search picks from (default 16; see ofa predictors)")
    s.add_argument("--target", default="this-machine", help="name for this machine's latency target")
    s.add_argument("--budgets", type=int, default=3, help="latency budgets along the front (default 3)")
    s.add_argument("--profile-backend", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="runtime of this machine's latency target (default onnxruntime; see `ofa profile --help`)")
    s.add_argument("--profile-rounds", type=int, default=6, help="interleaved timing passes (default 6)")
    s.add_argument("--profile-sample-ms", type=float, default=10.0,
                   help="each timing sample runs as many calls as fill this many ms (default 10)")
    s.add_argument("--profile-subnets", type=int, default=50,
                   help="random subnets timed end to end to fit and check the latency model (default 50)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("report", help="serve an artifact, specialise it for latency budgets, measure, report",
                       description="Start `ofa serve` on 127.0.0.1 for --artifact, ask it through `ofa-client` "
                       "for the Pareto front and the best subnet under each latency budget, fetch them, stop "
                       "the server, measure test accuracy and latency here, and write report.md, report.json "
                       "and pareto.png into --out. --baseline W trains torchvision's mobilenet_v3_small xW from "
                       "scratch on the same data for the same epochs and compares at its measured latency.")
    s.add_argument("--artifact", required=True, help="artifact with an accuracy predictor and --target's table")
    s.add_argument("--target", required=True, help="latency target of the artifact, profiled on this machine")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--budgets", type=int, default=3, help="latency budgets spread along the front (default 3)")
    s.add_argument("--budget-ms", type=float, action="append", help="an explicit latency budget (repeatable)")
    s.add_argument("--baseline", type=float, action="append", metavar="WIDTH",
                   help="also train mobilenet_v3_small with this width multiplier as a baseline (repeatable)")
    s.add_argument("--baseline-epochs", type=float, help="default: all of the artifact's training epochs")
    s.add_argument("--data-dir", help="where the dataset lies, if not where training found it")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("check", help="build a supernet, extract three subnets, check costs and outputs")
    s.add_argument("--space", default=DEFAULT_SPACE, choices=space_names())
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_check)

    s = sub.add_parser("train", help="train a supernet with progressive shrinking",
                       description="Train one supernet (full net, then elastic kernel, depth and "
                       "expand ratio with distillation) and write the artifact into --out. Runs "
                       "on one CPU or GPU, or under `torchrun --nproc_per_node N -m ofa train ...`.")
    s.add_argument("--out", required=True, help="artifact folder (checkpoints and metrics.jsonl go there too)")
    s.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: the demo (~6 min on 2 CPU cores); fashion: the quality run (35-55 min "
                   "on 2 CPU cores); cifar10; imagenet: the reference recipe (GPUs; its ImageFolder data is held "
                   "in memory, ~150 KB an image at 224 px). Default: quick")
    s.add_argument("--config", help="JSON file of config keys to override (same keys as --set)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. batch_size=64 or phases.kernel.epochs=2 (repeatable)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    s.add_argument("--phase", help="run only this phase (full, kernel, depth-1, depth-2, expand-1, expand-2), from "
                   "the checkpoint the phase before it left (kept in checkpoints/after-PHASE/); its "
                   "settings and later phases' may differ from that run's")
    s.add_argument("--dataset", help="fashion-mnist, cifar10 or imagefolder (default: the preset's)")
    s.add_argument("--data-dir", dest="data_dir", help="where the dataset lies (default: Debian's Fashion-MNIST)")
    s.add_argument("--space", help="search space (default mbv3-small-images; see `ofa spaces`)")
    s.add_argument("--seed", type=int)
    s.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("profile", help="measure this machine's latency into a latency table, or re-time it",
                       description="Time every distinct block configuration of a space (every kernel, expand ratio, "
                       "stage and resolution, plus stem and head) and subnets end to end on this machine, in a "
                       "timing process that imports only the runtime, and write a latency table (JSON, format "
                       "ofa-latency-table v2) whose model is fitted on most of those subnets and checked on the rest. "
                       "With --recalibrate, re-time a table's reference subnets instead (seconds) and store how much "
                       "faster or slower the device runs now.")
    s.add_argument("--artifact", help="artifact folder: its space is profiled and the table is stored "
                   "as latency/TARGET.json in it")
    s.add_argument("--space", help="profile a registered space instead (see `ofa spaces`)")
    s.add_argument("--space-file", help="profile the space defined in this JSON file instead (on a device: "
                   "`ofa-client supernets --json` gives it as space.definition_json)")
    s.add_argument("--target", help="name of this hardware target (letters, digits, -_.)")
    s.add_argument("--out", help="also write the table to this file")
    s.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="onnxruntime (default): every network exported to ONNX as a fetched --format onnx subnet "
                   "is, run in an onnxruntime CPU session; torch: eager torch modules, which at batch 1 on small "
                   "images measures Python dispatch as much as the network")
    s.add_argument("--threads", type=int, default=2, help="intra-op threads while timing (default 2)")
    s.add_argument("--batch", type=int, default=1, help="batch size while timing (default 1)")
    s.add_argument("--channels-last", action="store_true", help="time in channels_last memory format (torch only)")
    s.add_argument("--rounds", type=int, default=6, help="interleaved passes over all networks (default 6)")
    s.add_argument("--sample-ms", type=float, default=10.0,
                   help="each timing sample runs as many calls as fill this many ms (default 10)")
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
    s.add_argument("--timings-out", help="with --recalibrate: also write the references' timings here, for "
                   "`ofa-client search --reference-timings FILE`")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_profile)

    s = sub.add_parser("predictors", help="measure subnets and fit the accuracy predictor into an artifact",
                       description="Sample subnets stratified over MACs (corners included), re-calibrate "
                       "BN, measure validation accuracy, pick the predictor family by cross-validated "
                       "Kendall tau and store measurements and predictor in the artifact. Measurements "
                       "are kept: a later run measures only subnets not measured yet and fits on all. "
                       "The report includes the highest tau any predictor could expect against "
                       "measurements on a validation split of this size (from per-image correctness).")
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
    s.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of subnets held out for the reported quality (default 0.2)")
    s.add_argument("--calib-images", type=int, help="BN calibration images per subnet (default: all stored)")
    s.add_argument("--data-dir", help="where the training dataset lies, if not where training found it")
    s.add_argument("--plot", help="write a predicted-vs-measured plot (PNG) of the held-out subnets here")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print the quality report as JSON")
    s.set_defaults(func=_cmd_predictors)

    s = sub.add_parser("search", help="find the most accurate subnet under constraints",
                       description="Regularised evolution over the artifact's predictors. Exit code 3 "
                       "when the constraints cannot be met (the message gives the smallest achievable value).")
    _search_arguments(s, generations=500)
    s.set_defaults(func=_cmd_search)

    s = sub.add_parser("pareto", help="the accuracy-latency (or -MACs) front of an artifact")
    _search_arguments(s, generations=100)
    s.add_argument("-k", type=int, default=10, help="number of budgets along the front (default 10)")
    s.add_argument("--plot", help="write the front and the measured subnets as a PNG here")
    s.set_defaults(func=_cmd_pareto)

    s = sub.add_parser("serve", help="serve artifacts over gRPC (search, Pareto fronts, weights)",
                       description="Serve one or more supernet artifacts over gRPC (ofa.v1.SubnetService, "
                       "health and reflection). SIGTERM stops it after in-flight calls finish.")
    from ofa_server.args import add_arguments

    add_arguments(s)
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("info", help="show what an artifact holds and how good its predictors are")
    s.add_argument("--artifact", required=True)
    s.add_argument("--json", action="store_true", help="print the same as JSON")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("import-reference",
                       help="convert a reference OFAMobileNetV3 checkpoint (.pth) to safetensors")
    s.add_argument("--checkpoint", required=True, help="the reference checkpoint (state_dict .pth)")
    s.add_argument("--out", required=True, help="where to write the safetensors file")
    s.add_argument("--space", default="mbv3-imagenet", choices=space_names())
    s.set_defaults(func=_cmd_import_reference)
    return p


def main(argv: list[str] | None = None) -> int:
    from .search import Infeasible

    try:
        from safetensors import SafetensorError
    except ImportError:  # a device that only profiles needs torch, numpy and tqdm alone
        SafetensorError = ValueError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Infeasible as e:
        print(f"ofa {args.command}: infeasible: {e}", file=sys.stderr)
        return 3
    except (ValueError, LookupError, OSError, SafetensorError) as e:
        print(f"ofa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
