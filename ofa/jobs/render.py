"""PNG plots for reports (matplotlib, Agg backend; imported only when a plot is asked for)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["plot_pareto", "plot_predicted_vs_measured", "plot_report"]


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


def plot_pareto(front, out: str | Path, target: str | None, artifact: Path | None = None) -> Path:
    """The searched front (predicted accuracy vs latency or MACs) over the measured subnets of the artifact."""
    plt = _pyplot()
    metric = "latency_ms" if target else "macs"
    scale, label = (1.0, f"predicted latency on {target} (ms)") if target else (1e-6, "MMACs")
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    meas = artifact / "accuracy" / "measurements.json" if artifact is not None else None
    if meas is not None and meas.exists():
        from .search.load import load_scorer
        from .space import Arch

        subnets = json.loads(meas.read_text())["subnets"]
        scorer = load_scorer(artifact)
        archs = [Arch.from_dict(v["arch"]) for v in subnets.values()]
        codes = scorer.space.encode(archs)
        xs = scorer.latency_of(target)(codes) if target else scorer.cost.macs(codes) * scale
        ax.scatter(xs, [v["accuracy"] for v in subnets.values()], s=8, color="0.6",
                   label=f"measured subnets ({len(archs)}, validation accuracy)")
    xs = [getattr(c, metric) * scale for c in front]
    ax.plot(xs, [c.accuracy for c in front], "o-", color="tab:red", label="searched front (predicted)")
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
            color="tab:red", alpha=0.6, label="searched front (predicted, validation)")
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
