"""What reports look like: PNG plots (matplotlib, Agg backend, imported only when a plot is drawn) and markdown."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..predict.interval import share_within
from ..predict.latency import SPEED_TOLERANCE, Speed

__all__ = ["distinct_served", "plot_pareto", "plot_predicted_vs_measured", "plot_report", "render_markdown", "table_rows"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_predicted_vs_measured(measured: Sequence[float], predicted: Sequence[float], out: str | Path,
                               title: str, unit: str = "accuracy (%)", band: float | None = None) -> Path:
    """Scatter of predicted against measured with the identity line (and a ±band relative corridor)."""
    plt = _pyplot()
    m, p = np.asarray(measured, float), np.asarray(predicted, float)
    lo, hi = min(m.min(), p.min()), max(m.max(), p.max())
    pad = 0.03 * (hi - lo or 1)
    fig, ax = plt.subplots(figsize=(5.2, 5))
    line = np.array([lo - pad, hi + pad])
    ax.plot(line, line, color="0.4", lw=1, label="predicted = measured")
    if band:
        ax.fill_between(line, line * (1 - band), line * (1 + band), color="0.85", label=f"±{band:.0%}")
    ax.scatter(m, p, s=14, color="tab:blue", zorder=3)
    ax.set_xlabel(f"measured {unit}")
    ax.set_ylabel(f"predicted {unit}")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_pareto(front, out: str | Path, target: str | None, scorer=None,
                measured: dict[str, dict] | None = None) -> Path:
    """The searched front (predicted accuracy vs latency or MACs) over the ``measured`` subnets (the artifact's
    measurements, placed by ``scorer``'s predictions of their cost)."""
    plt = _pyplot()
    metric = "latency_ms" if target else "macs"
    scale, label = (1.0, f"predicted latency on {target} (ms)") if target else (1e-6, "MMACs")
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    if measured and scorer is not None:
        from ..space import Arch

        archs = [Arch.from_dict(v["arch"]) for v in measured.values()]
        codes = scorer.space.encode(archs)
        xs = scorer.latency_of(target)(codes) if target else scorer.cost.macs(codes) * scale
        ax.scatter(xs, [v["accuracy"] for v in measured.values()], s=8, color="0.6",
                   label=f"measured subnets ({len(archs)}, validation accuracy)")
    # a predictor that measured the validation-to-test shift predicts for the test split: drawn without it, on
    # the measured subnets' footing (validation accuracy)
    shift = scorer.accuracy.shift if scorer is not None and scorer.accuracy is not None else None
    offset = shift.offset if shift is not None else 0.0
    xs = [getattr(c, metric) * scale for c in front]
    ax.plot(xs, [c.accuracy - offset for c in front], "o-", color="tab:red",
            label="searched front (predicted validation accuracy" + (f"; answers add {offset:+.2f} for the test split)"
                                                                      if shift is not None else ")"))
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_report(report: dict, out: str | Path) -> Path:
    """The searched front (predicted) with the served subnets and baselines as measured (``ofa report``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    front = sorted(report["front"], key=lambda s: s["predicted_latency_ms"])
    ax.plot([s["predicted_latency_ms"] for s in front], [s["predicted_accuracy"] for s in front], "-",
            color="tab:red", alpha=0.6, label="searched front (predicted, as served)")
    for i, s in enumerate(report["served"]):
        px, py = s["predicted_latency_ms"], s["predicted_accuracy"]
        mx, my = s["measured_latency_ms"], s["test_accuracy"]
        ax.plot([px, mx], [py, my], color="0.6", lw=0.8)
        ax.scatter([px], [py], s=28, facecolors="none", edgecolors="tab:red", zorder=3,
                   label="served subnet, predicted" if i == 0 else None)
        ax.scatter([mx], [my], s=30, color="tab:blue", zorder=4,
                   label="served subnet, measured (test)" if i == 0 else None)
        ax.annotate(s["label"].replace("mobilenet_v3_small ", ""), (mx, my), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for i, b in enumerate(report.get("baselines") or []):
        ax.scatter([b["latency_ms"]], [b["test_accuracy"]], marker="s", s=34, color="tab:green", zorder=4,
                   label="mobilenet_v3_small from scratch (test)" if i == 0 else None)
        ax.annotate(b["name"].replace("mobilenet_v3_small ", ""), (b["latency_ms"], b["test_accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"latency on {report['target']} (ms)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{report['space']} on {report['dataset']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def distinct_served(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The served rows, each subnet once: two budgets that get the same subnet hold one measurement, not two
    (the first budget's row stands for it)."""
    first: dict[str, dict[str, Any]] = {}
    for s in report["served"]:
        first.setdefault(s["id"], s)
    return list(first.values())


def _same_subnet(report: dict[str, Any]) -> str:
    """A sentence naming the budgets whose subnet another budget got first, or ''."""
    first = {s["id"]: s["label"] for s in distinct_served(report)}
    same = [f"{s['label']} (= {first[s['id']]})" for s in report["served"] if first[s["id"]] != s["label"]]
    return f" Budgets that got a subnet served already, counted once: {', '.join(same)}." if same else ""


def _accuracy_checks(report: dict[str, Any]) -> list[str]:
    """Lines saying which served subnets miss the accuracy tolerance, and why."""
    served, tol = distinct_served(report), report["tolerances"]
    acc_miss = [s for s in served if abs(s["test_accuracy"] - s["predicted_accuracy"]) > tol["accuracy_points"]]
    acc = [f"Accuracy: {len(served) - len(acc_miss)} of {len(served)} served subnets measured within "
           f"{tol['accuracy_points']:g} point of the prediction on the test split." + _same_subnet(report)]
    with_iv = [s for s in served if s.get("predicted_accuracy_low") is not None]
    if with_iv:
        inside = sum(s["predicted_accuracy_low"] <= s["test_accuracy"] <= s["predicted_accuracy_high"] for s in with_iv)
        expected = sum(share_within((s["predicted_accuracy_high"] - s["predicted_accuracy_low"]) / 2,
                                    s["interval_level"], tol["accuracy_points"]) for s in with_iv)
        acc.append(f"Intervals: {inside} of {len(with_iv)} test accuracies inside their "
                   f"{with_iv[0]['interval_level']:.0%} interval (half-widths "
                   + ", ".join(f"{(s['predicted_accuracy_high'] - s['predicted_accuracy_low']) / 2:.2f}"
                               for s in with_iv) + " points"
                   + f"; at those widths about {expected:.1f} of "
                   f"{len(with_iv)} were to be expected within {tol['accuracy_points']:g} point)"
                   + "; extrapolated: " + (", ".join(s["label"] for s in with_iv if s.get("extrapolated")) or "none")
                   + "; measured before serving (validation, fp32 weights extracted from the supernet): "
                   + (", ".join(f"{s['label']} {s['measured_accuracy']:.2f}%" for s in served
                                if s.get("measured_accuracy") is not None) or "none") + ".")
    if acc_miss:
        q = report["accuracy_predictor"]
        offset = q["shift"]["offset"] if q.get("shift") else 0.0  # the prediction minus it: of validation accuracy
        pred_err = np.array([s["val_accuracy"] - (s["predicted_accuracy"] - offset) for s in served])
        shift = np.array([s["test_accuracy"] - s["val_accuracy"] for s in served])
        acc.append(
            f"Not within: {', '.join(s['label'] for s in acc_miss)}. The predictor ({q['family']}, fitted on "
            f"{q['train_samples']} measured subnets; held-out RMSE {(q['test'] or {}).get('rmse', float('nan')):.2f} "
            f"points on {q['test_samples']}) is fitted on *validation* accuracy ({report['val_images']} images)"
            + (f" and adds the validation-to-test shift it measured ({q['shift']['offset']:+.2f} points)"
               if q.get("shift") else "")
            + (" and the int8 drop measured on this runtime's int8 files (`ofa int8-accuracy`)"
               if (report.get("device") or {}).get("precision", "fp32") != "fp32" else "")
            + f": on these subnets the fit (without the shift) was off by {np.abs(pred_err).mean():.2f} "
            f"points on average against the validation split itself, and test accuracy differs from validation "
            f"accuracy by {shift.mean():+.2f} points on average. Search also picks the subnets the predictor rates "
            f"highest, so its errors are biased upward there (the winner's curse): more measured subnets shrink both.")
    return acc


def _latency_checks(report: dict[str, Any]) -> list[str]:
    """Lines saying which served subnets miss the latency tolerance, and why."""
    served, tol = distinct_served(report), report["tolerances"]
    lat_miss = [s for s in served
                if abs(s["measured_latency_ms"] / s["predicted_latency_ms"] - 1) > tol["latency_relative"]]
    lat = [f"Latency: {len(served) - len(lat_miss)} of {len(served)} measured within "
           f"{tol['latency_relative']:.0%} of the prediction the server made at this machine's speed "
           f"(the references re-timed just before searching)."]
    ref = report["reference"]
    if ref.get("untrusted_timings"):
        lat.append(f"**UNTRUSTED**: {', '.join(ref['untrusted_timings'])} failed the timing protocol's repeatability "
                   f"check even with more rounds and were used, labelled, only because the run was told to accept noisy "
                   f"timings.")
    if any(s.get("latency_noisy") for s in served):
        lat.append("**NOISY TABLE**: the target's table was profiled on a machine its own check called too noisy; "
                   "every answer said so (`latency_noisy`).")
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
    unsettled = [s for s in served if (s.get("speed_spread") or 0) > SPEED_TOLERANCE]
    if unsettled:
        lat.append(f"**SPEED UNSETTLED**: the answers for {', '.join(s['label'] for s in unsettled)} said the passes "
                   f"that timed the speed sent lay up to {max(s['speed_spread'] for s in unsettled):.1%} apart, more "
                   f"than {SPEED_TOLERANCE:.0%}: the client was told their latency may be off by about as much.")
    if ref.get("speed_changed"):
        lat.append(f"**SPEED CHANGED**: the references took x{ref['speed_change']:.3f} as long while the served "
                   f"subnets were timed as just before the searches, more than {SPEED_TOLERANCE:.0%} apart: this run's "
                   f"latency check compares a prediction made at one speed with a measurement at another (the errors "
                   f"at the second speed are those above).")
    if lat_miss:
        lat.append(f"Not within: {', '.join(s['label'] for s in lat_miss)}. A sign shared by all rows is the machine "
                   f"running at another speed than when the references were re-timed (a shared VM's other tenants: "
                   f"×1.7 swings within a minute were measured here); a spread is the table's error.")
    return lat


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def table_rows(report: dict[str, Any]) -> list[str]:
    """The markdown table: one row per served subnet, the best fitting baseline under each."""
    head = ("| budget | ≤ ms | subnet | res | acc. predicted | interval | acc. test | Δ | latency predicted "
            "| latency measured | Δ | MMACs | params | size | search |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    bases = report.get("baselines") or []
    for s in report["served"]:
        d_acc = s["test_accuracy"] - s["predicted_accuracy"]
        d_lat = s["measured_latency_ms"] / s["predicted_latency_ms"] - 1
        iv = ("—" if s.get("predicted_accuracy_low") is None else
              f"{s['predicted_accuracy_low']:.2f}–{s['predicted_accuracy_high']:.2f}"
              + (" (extrapolated)" if s.get("extrapolated") else ""))
        lines.append(f"| {s['label']} | {s['budget_ms']:.3f} | `{s['id']}` | {s['arch']['resolution']} "
                     f"| {s['predicted_accuracy']:.2f}% | {iv} | {s['test_accuracy']:.2f}% | {d_acc:+.2f} "
                     f"| {s['predicted_latency_ms']:.3f} ms | {s['measured_latency_ms']:.3f} ms | {d_lat:+.1%} "
                     f"| {s['macs'] / 1e6:.2f} | {s['params'] / 1e6:.3f} M | {_fmt_bytes(s['size_bytes'])} "
                     f"| {s['search_seconds']:.2f} s |")
        if bases:
            named = [b for b in bases if s["label"] == "=" + b["name"]]  # the baseline whose latency this is
            fits = named or [b for b in bases if b["budget_ms"] <= s["budget_ms"]]
            b = max(fits, key=lambda b: b["test_accuracy"]) if fits else min(bases, key=lambda b: b["latency_ms"])
            note = "" if fits else " (none fits: fastest)"
            lines.append(f"| ↳ baseline | | {b['name']}{note} | {b['resolution']} | — | — | {b['test_accuracy']:.2f}% | "
                         f"| — | {b['latency_ms']:.3f} ms | | {b['macs'] / 1e6:.2f} | {b['params'] / 1e6:.3f} M "
                         f"| {_fmt_bytes(b['size_bytes'])} | |")
    return lines


def _baseline_lines(report: dict[str, Any]) -> list[str]:
    """The paragraph on the baselines, and each one's verdict at its own latency (none without baselines)."""
    if not report.get("baselines"):
        return []
    channels = {b.get("in_channels", 3) for b in report["baselines"]}
    conv = "" if channels == {3} else f" but its input conv, for {'/'.join(map(str, sorted(channels)))}-channel images"
    epochs = ("" if report.get("baseline_epochs_given", True) else " (all phases of the supernet's training together)")
    parts = [f"Baselines: torchvision `mobilenet_v3_small` as shipped{conv}, trained from scratch "
             f"on the same training split for {report['baseline_epochs']:g} epochs{epochs} with the same optimiser, "
             "augmentation and cosine schedule, measured the same way. Budgets named `=…` are a baseline's "
             "latency as timed here just before the searches, in this machine's milliseconds then (the searches "
             "carried the speed the references were timed at in the same passes), so that baseline and subnet "
             "meet at equal latency; the latencies compared below come from one interleaved timing of both.", ""]
    for u in report.get("unmet") or []:
        parts.append(f"- at {u['label'][1:]}'s latency ({u['budget_ms']:.3f} ms): no subnet of the space is "
                     f"predicted to be this fast ({u['reason']}).")
    for s in report["served"]:
        if s["label"].startswith("="):
            b = next(b for b in report["baselines"] if b["name"] == s["label"][1:])
            verdict = "beats" if s["test_accuracy"] > b["test_accuracy"] else "does not beat"
            pace = s["measured_latency_ms"] / b["latency_ms"] - 1
            parts.append(f"- at {b['name']}'s latency ({b['latency_ms']:.3f} ms): the served subnet "
                         f"({s['measured_latency_ms']:.3f} ms, {abs(pace):.1%} "
                         f"{'slower' if pace > 0 else 'faster'}, timed in the same passes) {verdict} it, "
                         f"{s['test_accuracy']:.2f}% vs {b['test_accuracy']:.2f}% on the test split "
                         f"({s['macs'] / 1e6:.2f} vs {b['macs'] / 1e6:.2f} MMACs, {s['params'] / 1e6:.3f} vs "
                         f"{b['params'] / 1e6:.3f} M parameters).")
    parts.append("")
    return parts


def render_markdown(report: dict[str, Any], command: str | None = None) -> str:
    dev = report["device"]
    q = report["accuracy_predictor"]
    acc, lat = _accuracy_checks(report), _latency_checks(report)
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
        "Each subnet was found by an `ofa-client search` with the budget as its latency bound against `ofa serve`, fetched as "
        + ("BN-re-calibrated safetensors" if dev.get("precision", "fp32") == "fp32" else
           f"the BN-re-calibrated {dev['precision']} file the target runs (and its safetensors)")
        + " (sha256-verified), and measured here: top-1 on the "
        f"{report['test_images']:,}-image "
        + (f"evaluation half of the test split (the other half measured the predictor's validation-to-test shift, "
           f"{q['shift']['offset']:+.2f} points)" if q.get("shift") else "test split")
        + ", latency as the median of interleaved timed runs "
        f"({'torch eager' if dev.get('backend') == 'torch' else dev.get('backend')}, "
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
    parts += _baseline_lines(report)
    parts += ["![Pareto front](pareto.png)", "",
              "The line is the front the service searched (accuracy as the server predicts it for a served file: "
              "validation plus the shift to the test split where the predictor measured one, and the int8 drop on an "
              "int8 target; vs predicted latency); "
              "filled markers are the served subnets as measured here (test accuracy vs measured latency), "
              "joined to their predictions.", ""]
    return "\n".join(parts)
