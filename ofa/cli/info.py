"""``ofa spaces``, ``ofa check``, ``ofa info``: what is registered, what an artifact holds."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..artifact import ACCURACY_PREDICTOR, open_artifact
from ..space import DEFAULT_SPACE

__all__ = ["add_spaces", "run_spaces", "add_check", "run_check", "add_info", "run_info"]


def add_spaces(s: argparse.ArgumentParser) -> None:
    s.add_argument("--json", action="store_true", help="print the full space descriptions as JSON")


def run_spaces(args: argparse.Namespace) -> int:
    from ..space import get_space, space_names

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


def add_check(s: argparse.ArgumentParser) -> None:
    from ..space import space_names

    s.add_argument("--space", default=DEFAULT_SPACE, choices=space_names())
    s.add_argument("--seed", type=int, default=0)


def run_check(args: argparse.Namespace) -> int:
    """Build a supernet, extract three subnets, print and check their cost and outputs."""
    import torch

    from ..predict import CostModel, count_macs_params
    from ..space import get_space
    from ..supernet import Supernet, extract

    torch.manual_seed(args.seed)  # this command's own process: the supernet's random init
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


def add_info(s: argparse.ArgumentParser) -> None:
    s.add_argument("--artifact", required=True)
    s.add_argument("--json", action="store_true", help="print the same as JSON")


def _target_info(table: dict) -> dict:
    return {"device": table["device"], "blocks": len(table["entries"]), "model": table["model"],
            "fit": table.get("fit"), "timing": table.get("timing"), "recalibration": table.get("recalibration"),
            "references": len(table.get("references", []))}


def _artifact_info(root: Path) -> dict:
    """What ``ofa info`` shows of the artifact at ``root``, as JSON."""
    from ..export import subnet_file_metadata
    from ..predict.latency import validate_table

    files = open_artifact(root)
    manifest, targets = files.manifest, {}
    for target, name in files.latency_targets().items():
        try:
            table = validate_table(files.read_json(name))
        except (OSError, ValueError) as e:  # shown, not fatal: the other targets are still of use
            targets[target] = {"error": str(e)}
            continue
        targets[table["target"]] = _target_info(table)
    accuracy = None
    if files.has(ACCURACY_PREDICTOR):
        from ..predict.accuracy import AccuracyPredictor

        pred = AccuracyPredictor.from_bytes(files.read(ACCURACY_PREDICTOR))
        accuracy = {"family": pred.family, **{k: pred.info.get(k) for k in
                                              ("test", "train_samples", "test_samples", "learning_curve",
                                               "calib_images", "imported", "closed_loop")},
                    "interval": pred.interval.to_meta() if pred.interval is not None else None,
                    "shift": pred.shift.to_meta() if pred.shift is not None else None}
    return {"artifact": str(root), "digest": manifest["digest"], "space": manifest["space"],
            "dataset": manifest["dataset"], "created": manifest["created"],
            "val_accuracy": manifest.get("metrics", {}).get("val_accuracy", {}), "targets": targets,
            "accuracy_predictor": accuracy, "phases": [p["name"] for p in manifest.get("training", {}).get("phases", [])],
            "imported_from": {k: manifest["training"].get(k) for k in ("imported_from", "checkpoint", "sha256",
                                                                        "calib_dir", "calib_images")}
            if manifest.get("training", {}).get("imported_from") else None,
            "init_from": manifest.get("training", {}).get("init_from") or None,
            "fine_tuned": {sid: subnet_file_metadata(files.read(name)).get("finetuned", {})
                           for sid, name in files.finetuned().items()}}


def run_info(args: argparse.Namespace) -> int:
    """What an artifact holds: space, data, training figures, latency targets."""
    root = Path(args.artifact)
    info = _artifact_info(root)
    order = info.pop("phases")
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
        return 0
    _print_info(info, order)
    for sid, tuned in info["fine_tuned"].items():
        print(f"fine-tuned subnet {sid} (served in place of the extracted one): epochs {tuned.get('epochs')}, "
              f"test accuracy {tuned.get('test_accuracy_before')} -> {tuned.get('test_accuracy_after')}%")
    return 0


def _print_accuracy(accuracy: dict | None) -> None:
    if accuracy is None:
        print("accuracy predictor: none (run ofa predictors --artifact ...)")
    elif accuracy.get("imported"):
        src = accuracy["imported"]
        print(f"accuracy predictor: {accuracy['family']}, imported from {src.get('checkpoint')} "
              f"({src.get('layout')} layout)")
    else:
        test = accuracy["test"] or {}
        print(f"accuracy predictor: {accuracy['family']}, fitted on {accuracy['train_samples']} measured "
              f"subnets; on {accuracy['test_samples']} held out: Kendall tau {test.get('kendall_tau', float('nan')):.3f}, "
              f"RMSE {test.get('rmse', float('nan')):.3f} points")
        if "tau_ceiling" in test:
            print(f"  the validation split's noise lets any predictor reach at most tau {test['tau_ceiling']:.3f} "
                  f"on these subnets")
        iv = accuracy.get("interval")
        if iv:
            print(f"  {iv['level']:.0%} intervals: +/-{iv['q']:.2f} points at a measured subnet, growing by that "
                  f"every {iv['kappa']:g} arch choices away; they covered "
                  f"{test.get('interval_coverage', float('nan')):.0%} of the held-out subnets "
                  f"(mean +/-{test.get('interval_half_width', float('nan')):.2f})")
        else:
            print("  no interval (fitted before intervals, or imported): predictions carry no uncertainty")
        _print_shift(accuracy.get("shift"))
        loop = accuracy.get("closed_loop")
        if loop:
            print(f"  closed loop: {loop['rounds']} round(s), {loop['measured']} search picks measured; the last "
                  f"round's picks: {loop['within']} of {loop['picks']} inside their interval "
                  f"({'agreed' if loop['agreed'] else 'budget ran out before they agreed'})")


def _print_shift(shift: dict | None) -> None:
    if not shift:
        print("  predictions are of the validation split's accuracy (no test split measured)")
        return
    n = shift["info"]
    print(f"  predictions are for the test distribution: validation accuracy {shift['offset']:+.2f} points, the "
          f"shift measured on {n.get('subnets')} subnets ({n.get('shift_images')} test images); intervals include "
          f"its uncertainty (sigma {shift['sigma']:.2f}) and a check on {n.get('eval_images')} other test images")


def _print_info(info: dict, order: list[str]) -> None:
    from ..predict.latency import Speed

    accuracy, targets = info["accuracy_predictor"], info["targets"]
    print(f"artifact {info['artifact']}  (digest {info['digest'][:16]}, created {info['created']})")
    imported = info["imported_from"]
    if imported:
        print(f"space {info['space']}, imported from {imported['checkpoint']} (sha256 {imported['sha256'][:16]}, "
              f"{imported['imported_from']}); calibration: {imported['calib_images']} images"
              + (f" of {imported['calib_dir']}" if imported["calib_dir"] else " (none: ofa serve refuses it)"))
    else:
        print(f"space {info['space']}, trained on {info['dataset']}"
              + (f", starting from {info['init_from']}" if info["init_from"] else ""))
    for phase in sorted(info["val_accuracy"], key=lambda p: order.index(p) if p in order else len(order)):
        accs = info["val_accuracy"][phase]
        if not accs:  # evaluate_phases "last": the earlier phases were not evaluated
            continue
        print(f"  val. accuracy after {phase:9s} " + "  ".join(
            f"{k} {accs[k]:.2f}%" for k in ("smallest", "middle-1", "middle-2", "largest") if k in accs))
    _print_accuracy(accuracy)
    print(f"latency targets: {', '.join(targets) or 'none (run ofa profile --artifact ...)'}")
    for name, t in targets.items():
        if "error" in t:
            print(f"  {name}: not usable: {t['error']}")
            continue
        held = ((t.get("fit") or {}).get("quality") or {}).get("held_out") or {}
        rep = (t.get("timing") or {}).get("repeatability") or {}
        print(f"  {name}: {t['blocks']} blocks, {t['device'].get('cpu')}, {t['device'].get('threads')} threads, "
              f"{t['device'].get('backend')} {t['device'].get('backend_version', '')} "
              f"{t['device'].get('precision', 'fp32')}; model {t['model']['family']}")
        print(f"    end to end on {held.get('subnets', 0)} held-out subnets: {held.get('within_10pct', float('nan')):.0%}"
              f" within 10%, mean |error| {held.get('mean_abs_rel_error', float('nan')):.1%}, Spearman "
              f"{held.get('spearman', float('nan')):.3f}; timing: {rep.get('verdict', 'not recorded')}"
              + ("  [NOISY TABLE: every answer using it says so]" if rep and not rep.get("trusted", True) else ""))
        recal = t.get("recalibration")
        print(f"    speed: {Speed.from_dict(recal).describe()} of the profiled time, measured {recal.get('measured_at', '?')} "
              f"from {len(recal.get('ratios', []))} references" if recal else
              f"    speed: as profiled ({t['references']} references to re-time with `ofa profile --recalibrate`)")
