"""Figures of the analysis tools: convergence curves of ``compare`` (:func:`plot_curves`) and the attention figures
of ``analyze`` (layer x head heat maps, bin interrelation matrices, per-image overlays). matplotlib is imported
when a figure is drawn (Agg backend), not with the module."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

from ..relevance import Keypoints

if TYPE_CHECKING:
    from .runs import Run

__all__ = ["plot_curves", "plot_heatmaps", "plot_interrelation", "plot_overlays"]


def plot_curves(groups: dict[str, list[Run]], metric: str, target: float | None, path: Path,
                labels: dict[str, str] | None = None, wall_reliable: dict[str, bool | None] | None = None) -> None:
    """``curves.png``: the metric against optimizer steps, against cost (when every group has cost data) and
    against wall-clock (only when it is reliable for every group, see ``wall_clock_reliable``; computed against
    the first baseline group when ``wall_reliable`` is not given). Mean line over seeds, band = min..max."""
    from .runs import group_labels, is_baseline  # compare's pieces: not needed by the attention figures
    from .stats import wall_clock_reliable

    plt = _plt()
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


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ratio_image(ax, values, title: str, annotate: bool, xlabels=None, ylabels=None):
    """Heat map of ratios on a log2 scale centred on 1 (uniform), annotated with the ratios."""
    v = np.asarray(values, dtype=float)
    lv = np.log2(np.clip(v, 1e-3, None))
    lim = max(1.0, float(np.nanmax(np.abs(lv))) if np.isfinite(lv).any() else 1.0)
    im = ax.imshow(np.where(np.isfinite(v), lv, np.nan), cmap="RdBu_r", vmin=-lim, vmax=lim)
    if annotate:
        for (i, j), x in np.ndenumerate(v):
            ax.text(j, i, "–" if not np.isfinite(x) else f"{x:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=8)
    return im


def plot_heatmaps(rows: list[dict], layers: Sequence[int], heads: int, keys: list[str], labels: list[str],
                  path: Path) -> None:
    """Layer x head grids of the main numbers."""
    plt = _plt()
    panels = [
        ("rich_to_poor", f"interrelation {labels[-1]} → {labels[0]} kp", "ratio"),
        ("poor_to_rich", f"interrelation {labels[0]} → {labels[-1]} kp", "ratio"),
        (f"recv_{keys[0]}", f"received per {labels[0]}-kp patch", "ratio"),
        (f"recv_{keys[-1]}", f"received per {labels[-1]}-kp patch", "ratio"),
        (f"cls_ratio_{keys[0]}", f"CLS → {labels[0]}-kp patch", "ratio"),
        (f"cls_ratio_{keys[-1]}", f"CLS → {labels[-1]}-kp patch", "ratio"),
        ("kl", "KL(relevance || CLS attn)", "plain"),
        ("spearman", "Spearman(relevance, CLS attn)", "signed"),
        ("distance", "mean attention distance (patches)", "plain"),
        ("entropy", "attention entropy (nats)", "plain"),
    ]
    annotate = len(layers) * heads <= 160
    ncol = 5
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * max(3.0, 1.2 + 0.45 * heads),
                                                  nrow * max(2.4, 1.0 + 0.38 * len(layers))),
                             squeeze=False, layout="constrained")
    for ax, (key, title, kind) in zip(axes.flat, panels):
        grid = np.array([[r[key] for r in rows if r["layer"] == L] for L in layers], dtype=float)  # (L, h)
        if kind == "ratio":
            im = _ratio_image(ax, grid, title, annotate)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            cb.set_label("log2 ratio (0 = uniform)", fontsize=7)
        else:
            kw = dict(cmap="RdBu_r", vmin=-1, vmax=1) if kind == "signed" else dict(cmap="viridis")
            im = ax.imshow(grid, **kw)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            if annotate:
                for (i, j), x in np.ndenumerate(grid):
                    ax.text(j, i, "–" if not np.isfinite(x) else f"{x:.2f}", ha="center", va="center", fontsize=7,
                            color="k" if kind == "signed" else "w")
            ax.set_title(title, fontsize=8)
        ax.set_xticks(range(heads))
        ax.set_yticks(range(len(layers)), [str(L) for L in layers])
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_interrelation(res: dict, layers: Sequence[int], path: Path) -> None:
    """One bin x bin interrelation matrix (heads averaged) per layer."""
    plt = _plt()
    labels = res["labels"]
    ncol = min(len(layers), 6)
    nrow = math.ceil(len(layers) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol + 0.9, 2.5 * nrow + 0.5), squeeze=False,
                             layout="constrained")
    ratio = torch.nanmean(res["ratio"], dim=1).numpy()  # (L, K, K)
    im = None
    for ax, li in zip(axes.flat, range(len(layers))):
        im = _ratio_image(ax, ratio[li], f"layer {layers[li]}", True)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("key bin (keypoints)", fontsize=7)
        ax.set_ylabel("query bin", fontsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle("attention flow between SIFT concentration bins / uniform (heads averaged)", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8).set_label("log2 ratio (0 = uniform)", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _show_image(ax, img: Tensor) -> None:
    x = img.float().cpu()
    if x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(x[:3].permute(1, 2, 0).numpy().clip(0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def _show_patch_map(ax, img: Tensor, values: Tensor, grid: tuple[int, int], cmap: str, alpha: float = 0.55,
                    text: bool = False, vmax: float | None = None) -> None:
    import matplotlib.patheffects as pe

    _show_image(ax, img)
    h, w = img.shape[-2:]
    v = values.view(grid).float().numpy()
    ax.imshow(v, cmap=cmap, alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest", vmin=0,
              vmax=vmax if vmax is not None else max(float(v.max()), 1e-12))
    if text and max(grid) <= 16:
        ph, pw = h / grid[0], w / grid[1]
        for i, j in zip(*v.nonzero()):  # zeros left blank: the grid stays readable
            ax.text((j + 0.5) * pw - 0.5, (i + 0.5) * ph - 0.5, f"{int(v[i, j])}", ha="center", va="center",
                    fontsize=7, color="w", path_effects=[pe.withStroke(linewidth=1.5, foreground="k")])


def plot_overlays(images: Tensor, keypoints: Keypoints, attn: Tensor, counts: Tensor, grid: tuple[int, int],
                  titles: Sequence[str], attn_title: str, path: Path, grad: Tensor | None = None) -> None:
    """Rows of: image with SIFT keypoints, CLS attention over the image, keypoints per patch, (gradient)."""
    plt = _plt()
    n = images.shape[0]
    ncol = 4 if grad is not None else 3
    fig, axes = plt.subplots(n, ncol, figsize=(2.4 * ncol, 2.5 * n + 0.3), squeeze=False)
    for r in range(n):
        ax = axes[r, 0]
        _show_image(ax, images[r])
        v = keypoints.valid[r]
        xy = keypoints.xy[r][v].cpu().numpy()
        ax.scatter(xy[:, 0], xy[:, 1], s=6, c="red", edgecolors="none")
        ax.set_title(titles[r], fontsize=7)
        _show_patch_map(axes[r, 1], images[r], attn[r], grid, "jet")  # 0..max: uniform attention looks flat
        peak = float(attn[r].max()) * attn.shape[-1]
        axes[r, 1].set_title(f"{attn_title}\nmax {peak:.1f}x uniform", fontsize=7)
        _show_patch_map(axes[r, 2], images[r], counts[r], grid, "magma", alpha=0.6, text=True)
        axes[r, 2].set_title(f"keypoints per patch\n({int(v.sum())} in all)", fontsize=7)
        if grad is not None:
            _show_patch_map(axes[r, 3], images[r], grad[r], grid, "jet")
            axes[r, 3].set_title("|input gradient|\nof the prediction", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
