"""The interrelation analysis over an image set: sums of the per-image measures of
:mod:`siftguide.analysis.metrics` per layer and head (:class:`InterrelationStats`), one pass of a net over the
images (:func:`collect`), the per-layer/head table (:func:`metric_rows`) and the spurious-correlation ranking of
images and classes (:func:`spurious_tables`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import AttentionCapture, prefix_tokens
from ..relevance import relevance_from_keypoints
from ..relevance import Keypoints, counts_from_keypoints, detect_keypoints
from .images import normalise
from .metrics import (EPS, attention_entropy, bin_flow, bin_key, bin_labels, bin_mass, check_shape,
                      concentration_bins, input_gradient_attribution, kl_divergence, mean_attention_distance,
                      poor_share, spearman, split_attention)

__all__ = ["MAX_LEVEL", "RANK_BY", "InterrelationStats", "Collected", "collect", "metric_rows", "spurious_tables",
           "class_name", "imagenet_names"]

MAX_LEVEL = 16  # keypoint counts are accumulated per level 0..16 (16 = "16 or more"), bins are merged from levels

RANK_BY = ("excess", "share")


class InterrelationStats:
    """Sums of the per-image statistics over an image set, for every captured layer and head.

    Counts are kept per level ``0..MAX_LEVEL`` (keypoints per patch, the last level meaning "or more"), so any bin
    scheme, including terciles of the pooled counts, is merged exactly at the end (:meth:`result`).
    """

    def __init__(self, layers: Sequence[int], num_heads: int, grid: tuple[int, int], num_prefix: int,
                 cls_index: int) -> None:
        self.layers, self.num_heads, self.grid = list(layers), num_heads, tuple(grid)
        self.num_prefix, self.cls_index = num_prefix, cls_index
        self.num_patches = grid[0] * grid[1]
        nl, h, k = len(self.layers), num_heads, MAX_LEVEL + 1
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.flow, self.uniform, self.n = z(nl, h, k, k), z(k, k), z(k)
        self.send, self.cls = z(nl, h, k), z(nl, h, k)
        self.kl, self.rho, self.rho_n = z(nl, h), z(nl, h), z(nl, h)
        self.dist, self.entropy, self.cls_entropy, self.to_patches = z(nl, h), z(nl, h), z(nl, h), z(nl, h)
        self.images = 0

    @torch.no_grad()
    def update(self, maps: dict[int, Tensor], counts: Tensor, relevance: Tensor) -> dict[int, Tensor]:
        """Add a batch: ``maps[layer]`` ``(B, h, N, N)``, ``counts`` and ``relevance`` ``(B, P)``. Returns the CLS
        distributions ``(B, h, P)`` per layer (for overlays)."""
        check_shape(counts, 2, "(B, P)", "counts")
        if counts.shape[1] != self.num_patches or relevance.shape != counts.shape:
            raise ValueError(f"counts and relevance must be (B, P={self.num_patches}), got {tuple(counts.shape)} "
                             f"and {tuple(relevance.shape)}")
        levels = counts.round().long().clamp(0, MAX_LEVEL)
        k = MAX_LEVEL + 1
        cls_out = {}
        first = True
        for li, layer in enumerate(self.layers):
            attn = maps[layer]
            if attn.shape[1] != self.num_heads or attn.shape[-1] != self.num_patches + self.num_prefix:
                raise ValueError(f"layer {layer}: attention {tuple(attn.shape)} does not match (B, {self.num_heads}, "
                                 f"N, N) with N = {self.num_patches} patches + {self.num_prefix} prefix tokens")
            patch, cls, to_patches = split_attention(attn, self.num_prefix, self.cls_index)
            flow, uniform = bin_flow(patch, levels, k)
            self.flow[li] += flow.sum(0).double().cpu()
            if first:
                self.uniform += uniform.sum(0).double().cpu()
                self.n += F.one_hot(levels, k).sum((0, 1)).double().cpu()
                first = False
            self.send[li] += bin_mass(to_patches, levels, k).sum(0).double().cpu()
            self.cls[li] += bin_mass(cls, levels, k).sum(0).double().cpu()
            self.kl[li] += kl_divergence(relevance.unsqueeze(1), cls.clamp_min(EPS), 0.0).sum(0).double().cpu()
            rho = spearman(relevance.unsqueeze(1), cls)  # (B, h), NaN for constant relevance
            self.rho[li] += torch.nan_to_num(rho).sum(0).double().cpu()
            self.rho_n[li] += (~rho.isnan()).sum(0).double().cpu()
            self.dist[li] += mean_attention_distance(patch, self.grid).sum(0).double().cpu()
            self.entropy[li] += attention_entropy(patch).mean(-1).sum(0).double().cpu()
            self.cls_entropy[li] += attention_entropy(cls).sum(0).double().cpu()
            self.to_patches[li] += to_patches.mean(-1).sum(0).double().cpu()
            cls_out[layer] = cls
        self.images += counts.shape[0]
        return cls_out

    def histogram(self) -> Tensor:
        """``(MAX_LEVEL + 1,)`` number of patches (over the image set) with each keypoint count."""
        return self.n.clone()

    def result(self, thresholds: Sequence[int]) -> dict[str, Any]:
        """Merge the levels into the bins of ``thresholds`` (see :func:`concentration_bins`) and normalise.

        Returns tensors ``(L, h, ...)``: ``ratio (L, h, K, K)``, ``recv``, ``send``, ``cls_ratio``, ``cls_share``
        ``(L, h, K)``; ``kl``, ``spearman``, ``distance``, ``entropy``, ``cls_entropy``, ``prefix_share``
        ``(L, h)``; and ``patches_per_image`` ``(K,)``, ``labels`` (K bin labels), ``images``.
        """
        if self.images == 0:
            raise ValueError("no images were analysed")
        levels = torch.arange(MAX_LEVEL + 1).unsqueeze(0)
        bins = concentration_bins(levels, thresholds)[0]
        kb = len(thresholds) + 1
        g = F.one_hot(bins, kb).double()  # (levels, K)
        flow = g.T @ self.flow @ g  # (L, h, K, K)
        uniform = g.T @ self.uniform @ g  # (K, K)
        n = self.n @ g  # (K,)
        p, ntok = self.num_patches, self.num_patches + self.num_prefix
        nan = float("nan")

        def div(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(b > 0, a / b.clamp_min(EPS), torch.full_like(a, nan))

        m = self.images
        return dict(
            ratio=div(flow, uniform.expand_as(flow)),
            recv=div(flow.sum(-2), uniform.sum(-2).expand(flow.shape[:-2] + (kb,))),
            send=div(self.send @ g, (n * p / ntok).expand(self.send.shape[:-1] + (kb,))),
            cls_ratio=div(self.cls @ g, (n / p).expand(self.cls.shape[:-1] + (kb,))),
            cls_share=(self.cls @ g) / m,
            kl=self.kl / m,
            spearman=div(self.rho, self.rho_n),
            spearman_images=self.rho_n,
            distance=self.dist / m,
            entropy=self.entropy / m,
            cls_entropy=self.cls_entropy / m,
            prefix_share=1 - self.to_patches / m,
            patches_per_image=n / m,
            labels=bin_labels(thresholds),
            thresholds=tuple(thresholds),
            images=m,
        )


@dataclass
class Collected:
    """What one pass over the image set gathered (see :func:`collect`)."""

    stats: InterrelationStats
    index: list = field(default_factory=list)  # dataset index or file path per image
    labels: list[int] = field(default_factory=list)  # -1 when unknown
    preds: list[int] = field(default_factory=list)  # -1 when the net has no classifier
    attn: list[Tensor] = field(default_factory=list)  # (B, P) chosen layer/head CLS attention
    counts: list[Tensor] = field(default_factory=list)  # (B, P) keypoints per patch
    grad: list[Tensor] = field(default_factory=list)  # (B, P) input-gradient attribution (when computed)
    keypoints: list[int] = field(default_factory=list)

    def cat(self, name: str) -> Tensor:
        return torch.cat(getattr(self, name)) if getattr(self, name) else torch.empty(0)


def collect(net: nn.Module, batches: Iterable[dict], *, mean: Sequence[float], std: Sequence[float],
            sift: dict | None = None, relevance: dict | None = None, layer: int = -1, head: int | None = None,
            gradients: bool = False, device: str | torch.device = "cpu", progress: Any = None) -> Collected:
    """One pass over ``batches`` of ``{"image": (B, C, H, W) in [0, 1] at the net's size, "label": (B,),
    "index": list}``: SIFT keypoints per patch, all blocks' attention, the statistics of
    :class:`InterrelationStats`, and per image the CLS attention of ``layer`` / ``head`` (``None``: head mean),
    the prediction and, with ``gradients``, the input-gradient attribution."""
    net = net.eval().to(device)
    depth = len(net.blocks)
    cap = AttentionCapture(net, layers=list(range(depth)))
    pt = prefix_tokens(net)
    ph, pw = (int(s) for s in net.patch_embed.patch_size)
    sel_layer = cap.layers[layer] if -depth <= layer < depth else None
    if sel_layer is None:
        raise ValueError(f"layer {layer} out of range for a model with {depth} blocks")
    heads = net.blocks[0].attn.num_heads
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"head {head} out of range for a model with {heads} heads")
    mean_t = torch.as_tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    rel_kwargs = dict(relevance or {})
    out: Collected | None = None
    has_head = getattr(net, "num_classes", 0) > 0
    for batch in batches:
        images = batch["image"].to(device)
        check_shape(images, 4, "(B, C, H, W)", "images")
        b, _, h, w = images.shape
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        grid = (h // ph, w // pw)
        if out is None:
            out = Collected(InterrelationStats(cap.layers, heads, grid, pt["num_prefix"], pt["cls_index"]))
        sift_in = images if images.shape[1] in (1, 3) else images.mean(1, keepdim=True)
        kp: Keypoints = detect_keypoints(sift_in, **(sift or {}))
        counts = counts_from_keypoints(kp, grid, (ph, pw)).flatten(1)  # (B, P)
        rel = relevance_from_keypoints(kp, grid, (ph, pw), **rel_kwargs).flatten(1).to(device)
        with torch.no_grad(), cap.capture():
            logits = net(normalise(images, mean_t, std_t))
        cls = out.stats.update(cap.maps, counts, rel)[sel_layer]  # (B, h, P)
        cap.clear()
        chosen = cls.mean(1) if head is None else cls[:, head]
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        pred = logits.argmax(-1) if has_head and logits.ndim == 2 else torch.full((b,), -1)
        if gradients and has_head:
            g, pred = input_gradient_attribution(net, images, mean_t, std_t, (ph, pw))
            out.grad.append(g.cpu())
        out.index.extend(batch.get("index", range(len(out.labels), len(out.labels) + b)))
        lab = batch.get("label")
        out.labels.extend([-1] * b if lab is None else [int(v) for v in lab])
        out.preds.extend(int(v) for v in pred)
        out.attn.append(chosen.cpu())
        out.counts.append(counts.cpu())
        out.keypoints.extend(int(v) for v in kp.valid.sum(1))
        if progress is not None:
            progress.update(1)
    if out is None:
        raise ValueError("no images to analyse")
    return out


def metric_rows(res: dict, layers: Sequence[int], head_mean: bool = False) -> list[dict[str, Any]]:
    """One dict per layer/head (or per layer, heads averaged) with every number of :meth:`InterrelationStats.result`."""
    keys = [bin_key(lb) for lb in res["labels"]]
    kb = len(keys)
    rows = []
    heads = res["kl"].shape[1]
    for li, layer in enumerate(layers):
        for h in (["mean"] if head_mean else range(heads)):
            def get(name: str) -> Tensor:
                t = res[name][li]
                return torch.nanmean(t, 0) if head_mean else t[h]

            row: dict[str, Any] = {"layer": layer, "head": h}
            for k in range(kb):
                row[f"recv_{keys[k]}"] = float(get("recv")[k])
            for k in range(kb):
                row[f"send_{keys[k]}"] = float(get("send")[k])
            for k in range(kb):
                row[f"cls_ratio_{keys[k]}"] = float(get("cls_ratio")[k])
            for k in range(kb):
                row[f"cls_share_{keys[k]}"] = float(get("cls_share")[k])
            ratio = get("ratio")
            row["rich_to_poor"], row["poor_to_rich"] = float(ratio[-1, 0]), float(ratio[0, -1])
            row["rich_to_rich"], row["poor_to_poor"] = float(ratio[-1, -1]), float(ratio[0, 0])
            for a in range(kb):
                for b in range(kb):
                    row[f"flow_{keys[a]}_to_{keys[b]}"] = float(ratio[a, b])
            for name in ("kl", "spearman", "distance", "entropy", "cls_entropy", "prefix_share"):
                row[name] = float(get(name))
            row["spearman_images"] = int(res["spearman_images"][li, 0])  # the same for every head
            rows.append(row)
    return rows


def class_name(c: int, names: Sequence[str] | None) -> str:
    if c < 0:
        return "-"
    if names and c < len(names):
        return str(names[c])
    return str(c)


def imagenet_names(num_classes: int) -> list[str] | None:
    """Short ImageNet-1k class names for timm classifiers with 1000 outputs (None otherwise)."""
    if num_classes != 1000:
        return None
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    except Exception:  # noqa: BLE001 - older timm: numeric class ids
        return None


def spurious_tables(col: Collected, label_names: Sequence[str] | None, pred_names: Sequence[str] | None, by: str,
                    labels_match: bool = True, rank_by: str = "excess") -> tuple[list[dict], list[dict]]:
    """Per-image and per-class rows, most attention on keypoint-poor patches first.

    ``rank_by``: ``excess`` (share minus the fraction of poor patches; default) or ``share``. The raw share puts
    images with few keypoints first whatever the model does (an image without keypoints has share 1), so the
    excess over uniform attention is the default ranking. ``by``: group classes by ``"label"`` or ``"pred"``;
    ``labels_match``: the net predicts the data's classes (else no accuracy).
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    key = f"attn_poor_{rank_by}"
    attn, counts = col.cat("attn"), col.cat("counts")
    share, uniform = poor_share(attn, counts)
    grad = col.cat("grad")
    g_share = poor_share(grad, counts)[0] if grad.numel() else None
    images = []
    for i in range(len(col.index)):
        lab, pred = col.labels[i], col.preds[i]
        row = {
            "rank": 0, "index": col.index[i], "label": lab, "label_name": class_name(lab, label_names),
            "pred": pred, "pred_name": class_name(pred, pred_names),
            "correct": int(lab == pred) if labels_match and lab >= 0 and pred >= 0 else "",
            "keypoints": col.keypoints[i], "poor_patch_frac": float(uniform[i]),
            "attn_poor_share": float(share[i]), "attn_poor_excess": float(share[i] - uniform[i]),
        }
        if g_share is not None:
            row["grad_poor_share"] = float(g_share[i])
            row["grad_poor_excess"] = float(g_share[i] - uniform[i])
        images.append(row)
    order = sorted(range(len(images)), key=lambda i: -images[i][key])
    images = [images[i] for i in order]
    for r, row in enumerate(images, 1):
        row["rank"] = r
    groups: dict[int, list[dict]] = {}
    for row in images:
        groups.setdefault(row["label"] if by == "label" else row["pred"], []).append(row)
    classes = []
    for c, rs in groups.items():
        def m(k: str) -> float:
            return sum(r[k] for r in rs) / len(rs)

        name = class_name(c, label_names if by == "label" else pred_names)
        row = {"class": c, "name": name, "images": len(rs),
               "accuracy": (sum(r["correct"] for r in rs) / len(rs)) if rs[0]["correct"] != "" else "",
               "poor_patch_frac": m("poor_patch_frac"), "attn_poor_share": m("attn_poor_share"),
               "attn_poor_excess": m("attn_poor_excess")}
        if g_share is not None:
            row["grad_poor_share"], row["grad_poor_excess"] = m("grad_poor_share"), m("grad_poor_excess")
        classes.append(row)
    classes.sort(key=lambda r: -r[key])
    return images, classes
