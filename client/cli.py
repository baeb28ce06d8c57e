"""``ofa-client``: the server from a shell script or a deployment pipeline.

Exit codes: 0 success, 1 other error, 2 invalid argument, 3 infeasible constraints (or another
request the server cannot meet as it stands: deleting a target its artifact ships),
4 unknown supernet/target/subnet (or target exists), 5 server busy, unavailable or too
slow (retry), 6 not authenticated or not permitted (another client's target), 7 download
failed verification, 8 the server speaks an API version this client cannot use, 9 the
weights came from another supernet than the one the search ran on (a replica of another
artifact version: search again).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

from ._timer import ONNX_RUNTIMES
from .client import DEFAULT_FORMAT, FORMATS, Client, ClientError
from .flags import bounded, flag_errors

__all__ = ["main"]


# the library's field -> the flag a command line sets it with, for its messages
_CONNECTION_FLAGS = {"address": "--address", "timeout": "--timeout", "tls": "--ca-cert",
                     "token": "the token (--token-file, or $OFA_TOKEN)"}


def _client(args: argparse.Namespace) -> Client:
    token = None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    elif os.environ.get("OFA_TOKEN"):
        token = os.environ["OFA_TOKEN"].strip()
    tls: bool | str = bool(args.tls) if args.ca_cert is None else args.ca_cert  # '' is refused, never plaintext
    try:
        return Client(args.address, token=token, tls=tls, timeout=args.timeout, supernet=args.supernet or "")
    except ValueError as e:
        field, _, rest = str(e).partition(" ")
        raise ClientError("USAGE", f"{_CONNECTION_FLAGS.get(field.rstrip(':'), field)} {rest}") from None


def _constraint_kwargs(args: argparse.Namespace) -> dict:
    return {"max_latency_ms": args.max_latency_ms, "max_macs": args.max_macs, "max_params": args.max_params,
            "resolutions": args.resolution or (), "seed": args.seed, "population": args.population,
            "generations": args.generations, "reference_timings": args.reference_timings}


def _line(s) -> str:
    lat = f"{s.predicted_latency_ms:.3f} ms  " if s.predicted_latency_ms is not None else ""
    acc = f"accuracy {s.predicted_accuracy:.2f}%"
    if s.predicted_accuracy_low is not None:
        acc += f" [{s.predicted_accuracy_low:.2f}, {s.predicted_accuracy_high:.2f}] at {s.interval_level:.0%}"
    notes = [n for n, on in (("fine-tuned", s.fine_tuned),
                             ("EXTRAPOLATED: outside the measured subnets", s.extrapolated),
                             ("latency table profiled on a noisy machine", s.latency_noisy),
                             (f"SPEED UNSETTLED: its {s.speed_passes} timing passes lay {s.speed_spread:.1%} apart, "
                              "the latency may be off by as much", s.speed_unsettled)) if on]
    if s.measured_accuracy is not None:
        notes.insert(0, f"measured {s.measured_accuracy:.2f}% on {s.measured_images} {s.measured_split} images")
    return (f"{s.id}  {acc}  {lat}{s.macs / 1e6:.2f} MMACs  {s.params / 1e6:.3f} M params  "
            f"res {s.arch['resolution']}" + "".join(f"  ({n})" for n in notes))


def _search(c: Client, args: argparse.Namespace) -> int:
    s = flag_errors(lambda: c.search(args.target, min_accuracy=args.min_accuracy, **_constraint_kwargs(args)))
    if args.json:
        print(json.dumps(s.to_dict(), sort_keys=True))
    else:
        print(_line(s))
        print(f"  arch {json.dumps(s.arch)}\n  search took {s.search_seconds:.3f} s on the server")
    return 0


def _pareto(c: Client, args: argparse.Namespace) -> int:
    front = flag_errors(lambda: c.pareto(args.target, args.points, **_constraint_kwargs(args)))
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ClientError("USAGE", "--plot needs matplotlib (pip install matplotlib)") from None
        key = "predicted_latency_ms" if args.target else "macs"
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([getattr(s, key) for s in front], [s.predicted_accuracy for s in front], "o-")
        ax.set_xlabel(f"predicted latency on {args.target} (ms)" if args.target else "MACs")
        ax.set_ylabel("predicted accuracy (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    if args.json:
        print(json.dumps([s.to_dict() for s in front], sort_keys=True))
    else:
        for s in front:
            print(_line(s))
    return 0


def _fetch(c: Client, args: argparse.Namespace) -> int:
    if bool(args.id) == bool(args.arch):
        raise ClientError("USAGE", "give exactly one of --id or --arch")
    # --arch: an arch, or a search result (`search --json`), which also names the supernet
    subnet = args.id or _json_arg("--arch", args.arch)
    _check_out(args.out)  # said before the download, not after it
    w = c.fetch(subnet, args.format)
    w.save(args.out)
    info = {"out": args.out, "bytes": len(w.data), "sha256": w.sha256, "subnet_id": w.subnet_id,
            "format": w.format, "input_shape": list(w.input_shape), "mean": list(w.mean), "std": list(w.std),
            "fine_tuned": w.fine_tuned}
    print(json.dumps(info, sort_keys=True) if args.json else
          f"wrote {args.out}: {len(w.data)} bytes, sha256 {w.sha256} (verified), input {list(w.input_shape)}"
          + (", fine-tuned" if w.fine_tuned else ""))
    return 0


def _check_out(out: str) -> None:
    """Refuse an --out that names no file in an existing folder, before the work whose result it keeps."""
    if not Path(out).name or not Path(out).parent.is_dir():
        raise ClientError("USAGE", f"--out must be a file in an existing folder, got {out[:200]!r}")


def _json_arg(flag: str, value: str):
    """A JSON value given as text, or as @FILE; a ClientError (usage) naming ``flag`` when it is not one."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        why = "nests too deeply" if isinstance(e, RecursionError) else f"is not JSON ({e})"
        raise ClientError("USAGE", f"{flag} {value[:200]!r} {why}") from None


def _targets(c: Client, args: argparse.Namespace) -> int:
    targets = c.targets()
    if args.json:
        print(json.dumps(targets, sort_keys=True))
    for t in [] if args.json else targets:
        print(f"{t['name']:24s} {t['source']:10s} {t['cpu']}, {t['threads']} threads, {t['backend']} "
              f"{t['backend_version']} {t.get('precision') or 'fp32'}, {t['blocks']} blocks, model {t['model_family']}: held out "
              f"{t['held_out_within_10pct']:.0%} within 10%, mean |error| {t['mean_abs_rel_error']:.1%}; "
              f"speed x{t['speed']:.3f}" + (f" ({t['speed_passes']} passes {t['speed_spread']:.1%} apart)"
                                              if t.get("speed_passes", 0) > 1 else "")
              + f"; {len(t['references'])} references"
              + (f"; runs --format {fmt}" if (fmt := str(t.get("weights_format", "")).removeprefix(
                  "WEIGHTS_FORMAT_").lower()) in FORMATS else "")
              + (f"; NOISY: {t['noise']}" if t.get("noisy") else ""))
    return 0


def _supernets(c: Client, args: argparse.Namespace) -> int:
    sns = c.supernets()
    if args.json:
        print(json.dumps(sns, sort_keys=True))
    for s in [] if args.json else sns:
        q = s.get("accuracy_predictor")
        print(f"{s.get('name')}: space {s.get('space', {}).get('name')}, data {s.get('data', {}).get('dataset')}, "
              f"digest {str(s.get('digest'))[:16]}, "
              f"targets {s.get('targets', [])}" + (f", predictor tau {q.get('kendall_tau', 0):.3f}" if q else "")
              + (f" (at most {q['kendall_tau_ceiling']:.3f} on its validation split)"
                 if q and q.get("kendall_tau_ceiling") else "")
              + (f"; {q['interval_level']:.0%} intervals covered {q.get('interval_coverage', 0):.0%} of held-out "
                 f"subnets (mean +/-{q.get('interval_half_width', 0):.2f} points)" if q and q.get("interval_level")
                 else "")
              + (f"; accuracies predicted for the test distribution (validation {q['test_shift']:+.2f} points)"
                 if q and "test_shift" in q else ""))
    return 0


def _register(c: Client, args: argparse.Namespace) -> int:
    t = c.register_target(Path(args.table), replace=args.replace)
    print(json.dumps(t, sort_keys=True) if args.json else f"registered target {t['name']} for {t['supernet']}")
    return 0


def _server_space(c: Client) -> dict:
    """The search space of the supernet the client talks to (its ``supernet``, or the server's only one)."""
    sns = c.supernets()
    chosen = [s for s in sns if s.get("name") == c.supernet] if c.supernet else sns
    if len(chosen) != 1:
        raise ClientError("USAGE", f"give --supernet: the server holds {sorted(str(s.get('name')) for s in sns)}")
    try:
        return json.loads(chosen[0]["space"]["definition_json"])
    except (KeyError, TypeError, ValueError):
        raise ClientError("DATA_LOSS", "the server described its supernet without a space definition") from None


def _profile(c: Client, args: argparse.Namespace) -> int:
    if args.no_register and not args.out:
        raise ClientError("USAGE", "--no-register keeps nothing without --out FILE")
    from .timing import check_sizes
    from .values import check_target_name

    # refused before a kit is fetched and timed (minutes), naming the flag
    flag_errors(lambda: check_sizes(args.threads, 1, args.rounds, 2, args.sample_ms, args.warmup_ms))
    flag_errors(lambda: check_target_name(args.target))
    if args.out:
        _check_out(args.out)
    if args.kit:
        return _profile_kit(c, args, args.kit)
    with tempfile.TemporaryDirectory(prefix="ofa-kit-") as tmp:  # the server's kit of its supernet's space
        kit = c.fetch_kit(tmp, args.precision, timeout=max(args.timeout, 600.0), runtime=args.runtime)
        return _profile_kit(c, args, str(kit))


def _profile_kit(c: Client, args: argparse.Namespace, folder: str) -> int:
    from .profile import profile_kit, read_kit

    kit = read_kit(folder)
    if not args.no_register and _server_space(c) != kit["space"]:  # refused before minutes of timing
        raise ClientError("USAGE", f"the kit is of space {kit['space']['name']!r} (digest "
                          f"{kit['space_digest'][:12]}), not of the server's supernet: make the kit from its "
                          f"artifact (`ofa profile --kit DIR --artifact ARTIFACT`)")
    step = max(1, (len(kit["entries"]) + len(kit["subnets"])) * args.rounds // 20)
    progress = (lambda done, total: done % step == 0 and print(f"  timed {done}/{total}", file=sys.stderr))
    table = profile_kit(folder, args.target, args.runtime, args.threads, args.rounds, sample_ms=args.sample_ms,
                        warmup_ms=args.warmup_ms,
                        on_progress=(lambda d, t: None) if args.json else progress, provider=args.provider)
    if args.out:
        from .values import save_atomically

        save_atomically(args.out, json.dumps(table, indent=1, sort_keys=True).encode())
    held = table["fit"]["quality"].get("held_out") or {}
    summary = {"target": args.target, "blocks": len(table["entries"]), "subnets": len(kit["subnets"]),
               "seconds": table["profile_seconds"], "model": table["model"]["family"],
               "repeatability": table["timing"]["repeatability"]["verdict"], "held_out": held, "out": args.out}
    if not args.no_register:
        summary["registered"] = c.register_target(table, replace=args.replace)["name"]
    print(json.dumps(summary, sort_keys=True) if args.json else
          f"{summary['blocks']} blocks and {summary['subnets']} subnets timed in {summary['seconds']} s "
          f"({summary['repeatability']}); model {summary['model']}, on {held.get('subnets', 0)} held-out subnets: "
          f"{held.get('within_10pct', 0):.0%} within 10%, Spearman {held.get('spearman', 0):.3f}"
          + (f"; registered target {summary['registered']}" if "registered" in summary else "")
          + (f"; wrote {args.out}" if args.out else ""))
    return 0


def _delete(c: Client, args: argparse.Namespace) -> int:
    name = c.delete_target(args.target)
    print(json.dumps({"deleted": name}) if args.json else f"removed target {name}")
    return 0


def _health(c: Client, args: argparse.Namespace) -> int:
    status = c.health()
    print(json.dumps({"status": status}) if args.json else status)
    return 0 if status == "SERVING" else 5


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..2**64-1, got {text!r}")
    return value


def _constraint_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--target", help="hardware target (see `ofa-client targets`)")
    s.add_argument("--max-latency-ms", type=float)
    s.add_argument("--max-macs", type=int)
    s.add_argument("--max-params", type=int)
    s.add_argument("--resolution", type=int, action="append", help="allowed resolution (repeatable)")
    s.add_argument("--seed", type=_seed, default=0, help="same seed, same answer (default 0)")
    s.add_argument("--population", type=int, default=0, help="0: the server's default")
    s.add_argument("--generations", type=int, default=0, help="0: the server's default")
    s.add_argument("--reference-timings", metavar="FILE",
                   help="the target's reference subnets timed on the device just now (written by `ofa profile "
                   "--recalibrate --timings-out FILE`): latency is predicted at the device's speed today")


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("OFA_SERVER", "127.0.0.1:50051"),
                   help="server host:port, or replicas as ipv4:HOST:PORT,HOST:PORT (round robin; default "
                   "$OFA_SERVER or 127.0.0.1:50051)")
    p.add_argument("--supernet", help="which supernet (needed when the server holds several)")
    p.add_argument("--token-file", help="file with the bearer token (default: $OFA_TOKEN if set)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--ca-cert", help="use TLS trusting this PEM root certificate")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call (default 120)")
    p.add_argument("--json", action="store_true", help="machine-readable output (also after the command)")


def _protocol_args(s: argparse.ArgumentParser) -> None:
    """The timing protocol's sizes (``ofa_client.timing.check_sizes`` checks them)."""
    s.add_argument("--threads", type=int, default=2, help="intra-op threads while timing (default 2)")
    s.add_argument("--rounds", type=int, default=6, help="interleaved passes over all networks (default 6)")
    s.add_argument("--sample-ms", type=float, default=10.0, help="each sample fills this many ms (default 10)")
    s.add_argument("--warmup-ms", type=float, default=20.0,
                   help="each network runs this many ms before its first timed pass (default 20)")


def build_parser() -> argparse.ArgumentParser:
    """The ``ofa-client`` parser: connection flags, then one subcommand per call."""
    p = argparse.ArgumentParser(prog="ofa-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_args(p)
    # --json after the command too; SUPPRESS keeps a --json given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser = functools.partial(sub.add_parser, parents=[common])

    s = add_parser("search", help="the most accurate subnet meeting the constraints")
    _constraint_args(s)
    s.add_argument("--min-accuracy", type=float, help="instead: the fastest subnet at least this accurate")
    s.set_defaults(func=_search)
    s = add_parser("pareto", help="the accuracy-latency front")
    _constraint_args(s)
    s.add_argument("--points", type=int, default=10)
    s.add_argument("--plot", help="write the front as a PNG (needs matplotlib)")
    s.set_defaults(func=_pareto)
    s = add_parser("fetch", help="download a subnet's weights, verified by sha256")
    s.add_argument("--id", help="subnet id from search or pareto")
    s.add_argument("--arch", help="arch as JSON, or @FILE; a search result (`search --json`) also works, "
                   "and unlike --id any replica can answer it")
    s.add_argument("--format", default=DEFAULT_FORMAT, choices=sorted(FORMATS))
    s.add_argument("--out", required=True)
    s.set_defaults(func=_fetch)
    s = add_parser("targets", help="the hardware targets of the supernet")
    s.set_defaults(func=_targets)
    s = add_parser("supernets", help="what the server holds")
    s.set_defaults(func=_supernets)
    s = add_parser("register", help="upload a latency table made by `ofa profile` as a new target")
    s.add_argument("table", help="the table's JSON file")
    s.add_argument("--replace", action="store_true")
    s.set_defaults(func=_register)
    s = add_parser("profile", help="time a profiling kit on this device (no torch) and register it as a target")
    s.add_argument("--kit", help="time this kit folder (`ofa profile --kit DIR --artifact A` wrote it); default: "
                   "fetch the server's kit of its supernet's space")
    s.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="the precision of the kit fetched from the server (int8: its networks quantized as the "
                   "runtime's served int8 file is: onnx_int8 for onnxruntime, openvino_int8 for openvino); a --kit "
                   "folder says its own")
    s.add_argument("--target", required=True, help="the name of this device's target (letters, digits, -_.)")
    s.add_argument("--runtime", default=ONNX_RUNTIMES[0], choices=ONNX_RUNTIMES,
                   help="the runtime timed (default onnxruntime; openvino: pip install openvino)")
    s.add_argument("--provider", help="an onnxruntime execution provider (default CPUExecutionProvider)")
    _protocol_args(s)
    s.add_argument("--out", help="also write the table here (`register` it later from a machine with a route)")
    s.add_argument("--no-register", action="store_true", help="only time and write --out")
    s.add_argument("--replace", action="store_true", help="replace a target of this name registered before")
    s.set_defaults(func=_profile)
    s = add_parser("delete", help="remove a registered target (not one shipped in the artifact)")
    s.add_argument("target")
    s.set_defaults(func=_delete)
    s = add_parser("health", help="SERVING or not (exit 0 when serving)")
    s.set_defaults(func=_health)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one ``ofa-client`` command; the exit code says how it ended (see the module's docstring)."""
    args = build_parser().parse_args(argv)
    try:
        with _client(args) as c:
            return args.func(c, args)
    except ClientError as e:
        code = 2 if e.code == "USAGE" else e.exit_code
        print(f"ofa-client {args.command}: {bounded(str(e))}", file=sys.stderr)
        return code
    except (OSError, ValueError) as e:  # a path or a value given: said, never echoed whole
        print(f"ofa-client {args.command}: {bounded(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
