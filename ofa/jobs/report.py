"""Specialise an artifact for several latency budgets through the real service, then measure what came back.

``ofa report`` (and the last step of ``ofa demo``) starts ``ofa serve`` on 127.0.0.1
with an OS-chosen port, asks it through the ``ofa-client`` CLI for the Pareto front
and for the best subnet under each latency budget, fetches each subnet's weights
(sha256-verified by the client), and stops the server. Then it measures every served
subnet on this machine: accuracy on the test split (and on the validation split the
predictor was fitted to) and end-to-end latency timed the way the latency table was
profiled. With ``baselines``, torchvision's ``mobilenet_v3_small`` at the given width
multipliers is trained from scratch on the same data for the same number of epochs
and measured the same way; each baseline's measured latency is added as a budget, so
every baseline meets a subnet served for exactly its latency.

Writes ``report.md``, ``report.json``, ``pareto.png``, ``server.log`` and
``subnets/*.safetensors`` into the output folder.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .predict.latency import Speed

__all__ = ["ReportError", "ServerProcess", "budgets_from_front", "run_report"]

ACCURACY_TOLERANCE = 1.0   # points: a served subnet's test accuracy vs its prediction
LATENCY_TOLERANCE = 0.10   # relative: measured vs predicted latency
_LABELS = {1: ("middle",), 2: ("tight", "loose"), 3: ("tight", "middle", "loose"),
           5: ("tightest", "tight", "middle", "loose", "loosest")}


class ReportError(RuntimeError):
    """A step of the report failed; the message says which and where its log is."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ServerProcess:
    """``ofa serve`` in a child process on 127.0.0.1 and an OS-chosen port; SIGTERM on exit."""

    def __init__(self, artifacts: Sequence[Path], log_path: Path, startup_timeout: float = 300.0) -> None:
        self.cmd = [sys.executable, "-m", "ofa", "serve", "--host", "127.0.0.1", "--port", "0"]
        for a in artifacts:
            self.cmd += ["--artifact", str(a)]
        self.log_path, self.timeout = Path(log_path), startup_timeout
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def __enter__(self) -> "ServerProcess":
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log_path.read_text(errors="replace"))
            if m:
                self.address = f"127.0.0.1:{m.group(1)}"
                return self
            if self.proc.poll() is not None:
                raise ReportError(f"ofa serve exited with code {self.proc.returncode} before listening; "
                                  f"see {self.log_path}")
            time.sleep(0.2)
        self.stop()
        raise ReportError(f"ofa serve did not listen within {self.timeout:.0f} s; see {self.log_path}")

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM (in-flight calls finish), then wait; kill only if it hangs. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def _client_command() -> list[str]:
    exe = Path(sys.executable).with_name("ofa-client")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ofa_client.cli"]


def ofa_client(address: str, *args: str, log: Callable[[str], None] = print) -> Any:
    """Run ``ofa-client --json ARGS`` against ``address``; its JSON output, or ReportError with its message."""
    log(f"  $ ofa-client {' '.join(args)}")
    r = subprocess.run([*_client_command(), "--address", address, "--json", *args], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    if r.returncode:
        raise ReportError(f"ofa-client {args[0]} exited with code {r.returncode}: {r.stderr.strip()}", r.returncode)
    return json.loads(r.stdout)


def check_report_settings(budgets: int = 1, budget_ms: Sequence[float] = ()) -> None:
    """Refuse a setting :func:`run_report` cannot use, naming the field."""
    if budgets < 1 and not budget_ms:
        raise ValueError(f"budgets must be >= 1, got {budgets}")
    if any(not b > 0 for b in budget_ms):
        raise ValueError(f"budget_ms values must be > 0, got {list(budget_ms)}")


def budgets_from_front(latencies: Sequence[float], n: int) -> list[tuple[str, float]]:
    """``n`` labelled latency budgets spread over the front's range (10% to 90% of the way)."""
    lo, hi = min(latencies), max(latencies)
    labels = _LABELS.get(n, tuple(f"budget-{i + 1}" for i in range(n)))
    fracs = [0.5] if n == 1 else np.linspace(0.1, 0.9, n)
    return [(label, round(lo + f * (hi - lo), 3)) for label, f in zip(labels, fracs)]


def _train_baselines(art, widths: Sequence[float], epochs: float, out: Path, data_dir: str | None,
                     progress: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """mobilenet_v3_small × width, trained from scratch (cached in out/baselines by artifact and recipe)."""
    import torch
    from safetensors.torch import load_file, save_file

    from .data import load_dataset, split_validation
    from .scratch import mobilenet_v3_small_baseline, train_from_scratch

    training = art.manifest["training"]
    resolution = max(art.space.resolutions)
    folder = out / "baselines"
    folder.mkdir(parents=True, exist_ok=True)
    train_set = None
    rows = []
    for w in widths:
        name = f"mobilenet_v3_small x{w:g}"
        recipe = {"artifact": art.digest, "width_mult": w, "epochs": epochs, "resolution": resolution}
        weights, info_path = folder / f"mbv3-small-x{w:g}.safetensors", folder / f"mbv3-small-x{w:g}.json"
        net = mobilenet_v3_small_baseline(w, art.data.channels, art.data.num_classes)
        if info_path.exists() and weights.exists() and json.loads(info_path.read_text()).get("recipe") == recipe:
            net.load_state_dict(load_file(str(weights)))
            stats = json.loads(info_path.read_text())["training"]
            log(f"  {name}: reusing the one trained before ({weights})")
        else:
            if train_set is None:
                full, spec = load_dataset(training["dataset"], data_dir or training.get("data_dir") or None, True,
                                          training.get("image_size", 224))
                train_set, _ = split_validation(full, training["val_size"], training["seed"])
            torch.manual_seed(training["seed"])
            net, stats = train_from_scratch(net, resolution, train_set, art.data, training, epochs,
                                            training["seed"], progress, desc=f"{name} from scratch")
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
            info_path.write_text(json.dumps({"recipe": recipe, "training": stats}, indent=1))
            log(f"  {name}: trained {stats['steps']} steps in {stats['seconds']:.0f} s ({stats['img_per_s']:.0f} img/s)")
        rows.append({"name": name, "width_mult": w, "resolution": resolution, "module": net.eval(),
                     "params": sum(p.numel() for p in net.parameters()), "size_bytes": weights.stat().st_size,
                     "training": stats})
    return rows


def run_report(artifact: str | Path, target: str, out: str | Path, budgets: int = 3,
               budget_ms: Sequence[float] = (), baselines: Sequence[float] = (), baseline_epochs: float | None = None,
               data_dir: str | None = None, progress: bool = True,
               log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Serve ``artifact``, specialise it for the budgets through ``ofa-client``, measure; write the report.

    Latency goes through the one mechanism a deployment uses: the table's references are re-timed
    here first (the device's speed now, as ``ofa profile --recalibrate --timings-out`` does), every
    search carries those timings, and the served subnets are then timed with the references again,
    all by the timing protocol of :mod:`ofa.predict.timing`.
    """
    import torch

    from .artifact import load_artifact
    from .data import load_dataset
    from .evaluate import accuracy
    from .predict.cost import count_macs_params
    from .predict.latency import LatencyPredictor, validate_table
    from .predict.measure import validation_set
    from .predict.profile import reference_timings, speed_of, timing_of_table
    from .predict.timing import Part, subnet_part, time_parts
    from .subnet import load_subnet_safetensors

    artifact, out = Path(artifact), Path(out)
    art = load_artifact(artifact)
    table_file = f"latency/{target}.json"
    if table_file not in art.manifest["files"]:
        known = sorted(n[8:-5] for n in art.manifest["files"] if n.startswith("latency/"))
        raise ValueError(f"target {target!r} has no latency table in {artifact} (known: {known}); "
                         f"run `ofa profile --artifact {artifact} --target {target}` first")
    if "accuracy_predictor.safetensors" not in art.manifest["files"]:
        raise ValueError(f"{artifact} has no accuracy predictor; run `ofa predictors --artifact {artifact}` first")
    check_report_settings(budgets, budget_ms)
    table = validate_table(json.loads((artifact / table_file).read_text()), art.space)
    timing = timing_of_table(table)
    training = art.manifest["training"]
    epochs = baseline_epochs or sum(p["epochs"] for p in training["phases"])
    (out / "subnets").mkdir(parents=True, exist_ok=True)
    space = art.space
    refs = LatencyPredictor(space, table).references
    ref_parts = [subnet_part(space, arch) for arch, _ in refs]
    profiled = np.array([ms for _, ms in refs])
    base_rows: list[dict[str, Any]] = []
    if baselines:
        log(f"baselines: torchvision mobilenet_v3_small x{', x'.join(f'{w:g}' for w in baselines)}, "
            f"from scratch, {epochs:g} epochs at {max(space.resolutions)} px")
        base_rows = _train_baselines(art, baselines, epochs, out, data_dir, progress, log)
    res = max(space.resolutions)
    base_parts = [Part("mobilenet_v3_small", (space.in_channels, res, res), width_mult=r["width_mult"])
                  for r in base_rows]

    log(f"serving {artifact} (server log: {out / 'server.log'})")
    t_serve = time.perf_counter()
    timings_file = out / "reference-timings.json"
    speed_args = ("--target", target, "--reference-timings", str(timings_file))
    with ServerProcess([artifact], out / "server.log") as server:
        log(f"  ofa serve is listening on {server.address}")
        health = ofa_client(server.address, "health", log=log)["status"]
        # the steps of recalibrate() (the baselines timed in the same passes), as close to the searches and to
        # the timing of what they return as can be: a shared machine changes speed within a minute
        log(f"  timing the table's {len(refs)} reference subnets here now ({timing.backend}, {timing.threads} "
            f"threads), as a device does before it asks")
        before = time_parts(space, ref_parts + base_parts, timing, progress, desc="re-time references")
        ratios, speed = speed_of(before.ms[: len(refs)], profiled)
        recal = {**table, "recalibration": {**speed.to_dict(), "ratios": ratios}}
        timings_file.write_text(json.dumps(reference_timings(space, recal, before), indent=1))
        log(f"  this machine runs at {speed.describe()} of the time it took when profiled ({len(refs)} references; "
            f"{before.repeatability()['verdict']})")
        for row, ms in zip(base_rows, before.ms[len(refs):]):
            row["budget_ms"] = round(float(ms), 4)  # the search is told the speed now: a budget in today's ms
            row["macs"] = count_macs_params(row["module"], (space.in_channels, res, res))[0]
        front = ofa_client(server.address, "pareto", *speed_args, "--points", "10", log=log)
        spread = ([(f"budget-{i + 1}", float(b)) for i, b in enumerate(budget_ms)] if budget_ms else
                  budgets_from_front([s["predicted_latency_ms"] for s in front], budgets))
        plan = spread + [(f"={r['name']}", r["budget_ms"]) for r in base_rows]
        served, unmet = [], []
        for label, budget in plan:
            try:
                s = ofa_client(server.address, "search", *speed_args, "--max-latency-ms", f"{budget}", log=log)
            except ReportError as e:
                if e.exit_code != 3 or not label.startswith("="):  # 3: infeasible, expected only for baselines
                    raise
                log(f"  no subnet meets {budget} ms: {e}")
                unmet.append({"label": label, "budget_ms": budget, "reason": str(e).split(": ", 1)[-1]})
                continue
            files = {}
            for fmt in ("safetensors", "onnx") if timing.backend == "onnxruntime" else ("safetensors",):
                path = out / "subnets" / f"{s['id']}.{fmt}"
                fetched = ofa_client(server.address, "fetch", "--arch", json.dumps(s), "--format", fmt,
                                     "--out", str(path), log=log)
                files[fmt] = {"file": str(path.relative_to(out)), "bytes": fetched["bytes"], "sha256": fetched["sha256"]}
            served.append({"label": label, "budget_ms": budget, **s, "file": files["safetensors"]["file"],
                           "size_bytes": files["safetensors"]["bytes"], "sha256": files["safetensors"]["sha256"],
                           "files": files})
        code = server.stop()
    log(f"  server stopped (exit code {code}) after {time.perf_counter() - t_serve:.0f} s")

    log(f"measuring the {len(served)} served subnets on this machine: latency of the files as fetched, with the "
        f"references and baselines in the same interleaved passes; then test accuracy")
    fmt = "onnx" if timing.backend == "onnxruntime" else "safetensors"
    served_parts = [subnet_part(space, space.arch_from_json(json.dumps(s["arch"])), str(out / s["files"][fmt]["file"]))
                    for s in served]
    after = time_parts(space, served_parts + ref_parts + base_parts, timing, progress, desc="time served subnets")
    n = len(served)
    ratios_after, speed_after = speed_of(after.ms[n : n + len(refs)], profiled)
    raw = LatencyPredictor(space, table).with_speed(Speed())
    for s, ms, arch_raw in zip(served, after.ms, raw(space.encode([p.arch for p in served_parts]))):
        s["measured_latency_ms"] = round(float(ms), 4)
        s["raw_predicted_latency_ms"] = round(float(arch_raw), 4)
        s["drift_adjusted_error"] = round(float(ms / speed_after.apply(arch_raw) - 1), 4)
    for row, ms in zip(base_rows, after.ms[n + len(refs):]):
        row["latency_ms"] = round(float(ms), 4)
    modules = [load_subnet_safetensors((out / s["file"]).read_bytes())[0] for s in served]
    test, spec = load_dataset(training["dataset"], data_dir or training.get("data_dir") or None, False,
                              training.get("image_size", 224))
    val, _ = validation_set(training, data_dir)
    for s, m in zip(served, modules):
        r = s["arch"]["resolution"]
        s["test_accuracy"] = round(accuracy(m, test, spec, r), 3)
        s["val_accuracy"] = round(accuracy(m, val, spec, r), 3)
    for row in base_rows:
        row["test_accuracy"] = round(accuracy(row.pop("module"), test, spec, row["resolution"]), 3)
    reference = {"subnets": len(refs), "ratios_before": ratios, "speed_before": speed.to_dict(),
                 "ratios_after": ratios_after, "speed_after": speed_after.to_dict(),
                 "repeatability": after.repeatability()}
    report = {
        "artifact": str(artifact), "digest": art.digest, "space": space.name, "dataset": training["dataset"],
        "target": target, "device": table["device"], "table_fit": table.get("fit"), "reference": reference,
        "timing": timing.protocol(), "accuracy_predictor": _predictor_quality(artifact), "health": health,
        "front": front, "served": served, "unmet": unmet, "baselines": base_rows,
        "baseline_epochs": epochs if base_rows else None, "test_images": len(test), "val_images": len(val),
        "tolerances": {"accuracy_points": ACCURACY_TOLERANCE, "latency_relative": LATENCY_TOLERANCE},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    from .plots import plot_report

    plot_report(report, out / "pareto.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    (out / "report.md").write_text(render_markdown(report))
    return report


def _predictor_quality(artifact: Path) -> dict[str, Any]:
    from .predict.accuracy import AccuracyPredictor

    pred = AccuracyPredictor.from_bytes((artifact / "accuracy_predictor.safetensors").read_bytes())
    return {"family": pred.family, "train_samples": pred.info.get("train_samples"),
            "test_samples": pred.info.get("test_samples"), "test": pred.info.get("test")}


def _checks(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Lines saying which served subnets miss the accuracy and latency tolerances, and why."""
    served, tol = report["served"], report["tolerances"]
    acc_miss = [s for s in served if abs(s["test_accuracy"] - s["predicted_accuracy"]) > tol["accuracy_points"]]
    lat_miss = [s for s in served
                if abs(s["measured_latency_ms"] / s["predicted_latency_ms"] - 1) > tol["latency_relative"]]
    acc = [f"Accuracy: {len(served) - len(acc_miss)} of {len(served)} served subnets measured within "
           f"{tol['accuracy_points']:g} point of the prediction on the test split."]
    if acc_miss:
        q = report["accuracy_predictor"]
        pred_err = np.array([s["val_accuracy"] - s["predicted_accuracy"] for s in served])
        shift = np.array([s["test_accuracy"] - s["val_accuracy"] for s in served])
        acc.append(
            f"Not within: {', '.join(s['label'] for s in acc_miss)}. The predictor ({q['family']}, fitted on "
            f"{q['train_samples']} measured subnets; held-out RMSE {(q['test'] or {}).get('rmse', float('nan')):.2f} "
            f"points on {q['test_samples']}) predicts *validation* accuracy ({report['val_images']} images): on "
            f"these subnets it was off by {np.abs(pred_err).mean():.2f} points on average against the validation "
            f"split itself, and test accuracy differs from validation accuracy by {shift.mean():+.2f} points on "
            f"average. Search also picks the subnets the predictor rates highest, so its errors are biased "
            f"upward there (the winner's curse): more measured subnets shrink both.")
    lat = [f"Latency: {len(served) - len(lat_miss)} of {len(served)} measured within "
           f"{tol['latency_relative']:.0%} of the prediction the server made at this machine's speed "
           f"(the references re-timed just before searching)."]
    ref = report["reference"]
    raw_err = [s["measured_latency_ms"] / s["raw_predicted_latency_ms"] - 1 for s in served]
    raw_in = sum(abs(e) <= tol["latency_relative"] for e in raw_err)
    lat.append(f"Raw, the table as profiled (no recalibration): {raw_in} of {len(served)} within "
               f"{tol['latency_relative']:.0%} ({min(raw_err, default=0):+.1%} to {max(raw_err, default=0):+.1%}).")
    held = ((report.get("table_fit") or {}).get("quality") or {}).get("held_out") or {}
    adj = [s["drift_adjusted_error"] for s in served]
    lat.append(
        f"Speed: the {ref['subnets']} reference subnets ran at {Speed.from_dict(ref['speed_before']).describe()} of "
        f"their profiled time before the searches and {Speed.from_dict(ref['speed_after']).describe()} while the "
        f"served subnets were timed (timing: "
        f"{ref['repeatability']['verdict']}). At the second speed the errors range {min(adj, default=0):+.1%} to "
        f"{max(adj, default=0):+.1%}: that is the table's own error (its model, on {held.get('subnets', 0)} held-out "
        f"subnets when profiled: {held.get('within_10pct', float('nan')):.0%} within 10%, mean |error| "
        f"{held.get('mean_abs_rel_error', float('nan')):.1%}); the rest is the machine changing speed.")
    if lat_miss:
        lat.append(f"Not within: {', '.join(s['label'] for s in lat_miss)}. A sign shared by all rows is the machine "
                   f"running at another speed than when the references were re-timed (a shared VM's other tenants: "
                   f"×1.7 swings within a minute were measured here); a spread is the table's error.")
    return acc, lat


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def table_rows(report: dict[str, Any]) -> list[str]:
    """The markdown table: one row per served subnet, the best fitting baseline under each."""
    head = ("| budget | ≤ ms | subnet | res | acc. predicted | acc. test | Δ | latency predicted | latency measured "
            "| Δ | MMACs | params | size | search |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    bases = report.get("baselines") or []
    for s in report["served"]:
        d_acc = s["test_accuracy"] - s["predicted_accuracy"]
        d_lat = s["measured_latency_ms"] / s["predicted_latency_ms"] - 1
        lines.append(f"| {s['label']} | {s['budget_ms']:.3g} | `{s['id']}` | {s['arch']['resolution']} "
                     f"| {s['predicted_accuracy']:.2f}% | {s['test_accuracy']:.2f}% | {d_acc:+.2f} "
                     f"| {s['predicted_latency_ms']:.3f} ms | {s['measured_latency_ms']:.3f} ms | {d_lat:+.1%} "
                     f"| {s['macs'] / 1e6:.2f} | {s['params'] / 1e6:.3f} M | {_fmt_bytes(s['size_bytes'])} "
                     f"| {s['search_seconds']:.2f} s |")
        if bases:
            named = [b for b in bases if s["label"] == "=" + b["name"]]  # the baseline whose latency this is
            fits = named or [b for b in bases if b["budget_ms"] <= s["budget_ms"]]
            b = max(fits, key=lambda b: b["test_accuracy"]) if fits else min(bases, key=lambda b: b["latency_ms"])
            note = "" if fits else " (none fits: fastest)"
            lines.append(f"| ↳ baseline | | {b['name']}{note} | {b['resolution']} | — | {b['test_accuracy']:.2f}% | "
                         f"| — | {b['latency_ms']:.3f} ms | | {b['macs'] / 1e6:.2f} | {b['params'] / 1e6:.3f} M "
                         f"| {_fmt_bytes(b['size_bytes'])} | |")
    return lines


def render_markdown(report: dict[str, Any], command: str | None = None) -> str:
    dev = report["device"]
    q = report["accuracy_predictor"]
    acc, lat = _checks(report)
    parts = [
        f"# Specialised subnets of `{report['space']}` for `{report['target']}`",
        "",
        f"Artifact `{report['artifact']}` (digest `{report['digest'][:16]}`), trained on {report['dataset']}; "
        f"made {report['created']}" + (f" by `{command}`." if command else "."),
        f"Target `{report['target']}`: {dev.get('cpu')}, {dev.get('threads')} threads, batch {dev.get('batch')}, "
        f"{dev.get('backend')} {dev.get('backend_version', '')}. Accuracy predictor: {q['family']} on "
        f"{q['train_samples']} measured subnets (held-out Kendall τ {(q['test'] or {}).get('kendall_tau', float('nan')):.3f}, "
        f"RMSE {(q['test'] or {}).get('rmse', float('nan')):.2f} points).",
        "",
        "Each subnet was found by `ofa-client search --max-latency-ms BUDGET` against `ofa serve`, fetched as "
        "BN-re-calibrated safetensors (sha256-verified), and measured here: top-1 on the "
        f"{report['test_images']:,}-image test split, latency as the median of interleaved timed runs "
        f"({'onnxruntime' if dev.get('backend') == 'onnxruntime' else 'torch eager'}, "
        "the table's threads and batch, by the timing protocol of `ofa profile`).",
        "",
        *(["Wall time per step: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["steps_seconds"].items())
           + ".", ""] if report.get("steps_seconds") else []),
        *table_rows(report),
        "",
        *acc,
        "",
        *lat,
        "",
    ]
    if report.get("baselines"):
        parts += [f"Baselines: torchvision `mobilenet_v3_small` as shipped (grey input conv), trained from scratch "
                  f"on the same training split for {report['baseline_epochs']:g} epochs (all phases of the "
                  "supernet's training together) with the same optimiser, augmentation and cosine schedule, "
                  "measured the same way. Budgets named `=…` are a baseline's measured latency in the table's "
                  "units (divided by how much slower the machine ran than when the table was profiled, from the "
                  "reference subnets timed with it), so that baseline and subnet meet at equal latency; the "
                  "latencies compared below come from one interleaved timing of both.", ""]
        for u in report.get("unmet") or []:
            parts.append(f"- at {u['label'][1:]}'s latency ({u['budget_ms']:.3f} ms): no subnet of the space is "
                         f"predicted to be this fast ({u['reason']}).")
        for s in report["served"]:
            if s["label"].startswith("="):
                b = next(b for b in report["baselines"] if b["name"] == s["label"][1:])
                verdict = "beats" if s["test_accuracy"] > b["test_accuracy"] else "does not beat"
                pace = s["measured_latency_ms"] / b["latency_ms"] - 1
                parts.append(f"- at {b['name']}'s latency ({b['latency_ms']:.3f} ms): the served subnet "
                             f"({s['measured_latency_ms']:.3f} ms, {abs(pace):.0%} "
                             f"{'slower' if pace > 0 else 'faster'}, timed in the same passes) {verdict} it, "
                             f"{s['test_accuracy']:.2f}% vs {b['test_accuracy']:.2f}% on the test split "
                             f"({s['macs'] / 1e6:.2f} vs {b['macs'] / 1e6:.2f} MMACs, {s['params'] / 1e6:.3f} vs "
                             f"{b['params'] / 1e6:.3f} M parameters).")
        parts.append("")
    parts += ["![Pareto front](pareto.png)", "",
              "The line is the front the service searched (predicted validation accuracy vs predicted latency); "
              "filled markers are the served subnets as measured here (test accuracy vs measured latency), "
              "joined to their predictions.", ""]
    return "\n".join(parts)
