"""Figures of the analysis tools: convergence curves of ``compare`` (:func:`plot_curves`)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .runs import Run, group_labels, is_baseline
from .stats import wall_clock_reliable

__all__ = ["plot_curves"]


def plot_curves(groups: dict[str, list[Run]], metric: str, target: float | None, path: Path,
                labels: dict[str, str] | None = None, wall_reliable: dict[str, bool | None] | None = None) -> None:
    """``curves.png``: the metric against optimizer steps, against cost (when every group has cost data) and
    against wall-clock (only when it is reliable for every group, see ``wall_clock_reliable``; computed against
    the first baseline group when ``wall_reliable`` is not given). Mean line over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or group_labels(groups)
    if wall_reliable is None:
        base = next((g for g, rs in groups.items() if all(is_baseline(r) for r in rs)), None)
        wall_reliable = wall_clock_reliable(groups, metric, base)
    has_cost = all(np.isfinite(r.curve(metric)["cost"]).all() for rs in groups.values() for r in rs)
    axes_x = [("step", "optimizer steps")]
    if has_cost:
        axes_x.append(("cost", "training compute, cost (s)"))
    if all(v is True for v in wall_reliable.values()):
        axes_x.append(("time", "training wall-clock (s)"))
    ncol = min(3, len(groups))
    legend_h = 0.2 * math.ceil(len(groups) / ncol) + 0.2  # legend below the plots
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6.5 * len(axes_x), 4.8 + legend_h), squeeze=False)
    axes = axes[0]
    for g, rs in groups.items():
        curves = [r.curve(metric) for r in rs]
        steps = np.unique(np.concatenate([c["step"].to_numpy() for c in curves]))
        vals = np.stack([np.interp(steps, c["step"], c["value"], right=np.nan) for c in curves])
        mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
        color = None
        for ax, (col, _) in zip(axes, axes_x):
            x = steps if col == "step" else np.nanmean(
                np.stack([np.interp(steps, c["step"], c[col], right=np.nan) for c in curves]), 0)
            (line,) = ax.plot(x, mean, color=color, label=f"{labels.get(g, g)} (n={len(rs)})")
            color = line.get_color()
            ax.fill_between(x, lo, hi, alpha=0.2, color=color)
    for ax, (_, xl) in zip(axes, axes_x):
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    left_out = [] if has_cost else ["cost: no cost data"]
    if axes_x[-1][0] != "time":
        left_out.append("wall-clock: " + ("unreliable (contention)" if any(v is False for v in wall_reliable.values())
                                          else "not checkable without cost data"))
    fig.suptitle(f"{metric}: mean over seeds, band = min..max" + (" ; dashed = target" if target is not None else "")
                 + (f"\nleft out: {'; '.join(left_out)}" if left_out else ""))
    fig.tight_layout(rect=(0, legend_h / (4.8 + legend_h), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
