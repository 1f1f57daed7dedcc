"""SIFT-weighted patch interrelation analysis of a ViT's multi-head self-attention (Wu et al. 2022, arXiv 2211.08543).

Patches carry different *semantic concentration*: the number of SIFT keypoints that fall in them. For every layer
and head the analysis measures how attention flows between patches of high and low concentration, how well the
class token's attention agrees with the SIFT relevance map, and, at inference, which images and classes put their
attention (and their input gradients) on keypoint-poor patches: candidates for spurious correlations.

Notation, per image: attention probabilities ``A`` ``(h, N, N)`` of one block (timm's exact softmax, captured by
:class:`~siftguide.attention.AttentionCapture`), ``N = n_prefix + P`` tokens; ``Ā`` is the patch-to-patch block with
each query row renormalised over the ``P`` patch keys (prefix tokens removed); ``c`` the class token's attention
over the patches, renormalised (models without a class token: the attention each patch receives, averaged over
patch queries); ``bin(i)`` the concentration bin of patch ``i`` (default: 0 / 1 / 2+ keypoints; or terciles of the
keypoint count over the image set); ``n_a`` the number of patches in bin ``a``. Sums run over the image set.

* interrelation ratio ``R[a, b] = Σ Σ_{i∈a, j∈b} Ā[i, j] / Σ n_a n_b / P``: attention flowing from the queries of bin
  ``a`` to the keys of bin ``b`` relative to uniform attention (1 = uniform, > 1 = preferred);
* received ratio ``recv[b] = Σ Σ_{j∈b} Σ_i Ā[i, j] / Σ n_b``: mean attention a patch of bin ``b`` receives, relative
  to the uniform ``1 / P`` per query (the column sums of ``R``, weighted);
* sent ratio ``send[a] = Σ Σ_{i∈a} Σ_{j patch} A[i, j] / (Σ n_a · P / N)``: the share of its attention a patch of bin
  ``a`` sends to patch tokens (not to CLS / registers), relative to uniform attention over all ``N`` tokens;
* CLS ratio ``cls[b] = Σ Σ_{j∈b} c_j / Σ (n_b / P)`` and CLS share ``Σ_{j∈b} c_j`` (mean over images);
* agreement with SIFT relevance ``r`` (:func:`~siftguide.relevance.relevance_from_keypoints`, uniform for images
  without keypoints): ``KL(r || c) = Σ_j r_j log(r_j / c_j)`` and Spearman's rank correlation of ``r`` and ``c``
  (average ranks for ties; images with a constant ``r`` are skipped), per image, averaged;
* mean attention distance ``Σ_j Ā[i, j] · ||pos_i - pos_j||`` in patches, averaged over queries (Dosovitskiy et al.
  2021, Fig. 7), and attention entropy ``-Σ_j Ā[i, j] log Ā[i, j]`` in nats (patch queries) and of ``c``.

Spurious-correlation signals, per image: the share of the CLS attention of a chosen layer/head (default: last layer,
head mean) on keypoint-poor (0-keypoint) patches, and the share of the input-gradient attribution
``Σ_{pixels of j} Σ_channels |∂ logit_pred / ∂ x|`` on those patches; ``excess = share - (poor patches / P)`` is what
the image gives them beyond uniform.

Command line (``python -m siftguide.analysis.analyze --help``)::

    python -m siftguide.analysis.analyze logs/train/runs/<date>/checkpoints/last.ckpt --out analysis/
    python -m siftguide.analysis.analyze vit_small_patch16_224 --out analysis/ --images photos/ --num-images 64
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import AttentionCapture, prefix_tokens
from ..relevance import MODES as RELEVANCE_MODES
from ..relevance import patch_positions, relevance_from_keypoints
from ..sift import Keypoints, counts_from_keypoints, detect_keypoints, rgb_to_gray

__all__ = [
    "BIN_SCHEMES", "concentration_thresholds", "concentration_bins", "bin_labels", "split_attention", "bin_flow",
    "bin_mass", "kl_divergence", "average_ranks", "spearman", "patch_distances", "mean_attention_distance",
    "attention_entropy", "poor_share", "input_gradient_attribution", "prepare_images", "InterrelationStats",
    "collect", "analyze", "main",
]

BIN_SCHEMES = ("fixed", "tercile")
MAX_LEVEL = 16  # keypoint counts are accumulated per level 0..16 (16 = "16 or more"), bins are merged from levels
RANDOM_INIT = "RANDOM INIT: pretrained weights not available"
_EPS = 1e-12


# ================================================================================================ pure functions
def _check(t: Tensor, ndim: int, shape: str, name: str) -> None:
    if not isinstance(t, Tensor) or t.ndim != ndim:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {shape}, got {got}")


def concentration_thresholds(histogram: Tensor, scheme: str = "fixed") -> tuple[int, ...]:
    """Lower keypoint-count bounds of bins ``1..K-1`` (bin 0 starts at 0).

    ``fixed``: ``(1, 2)``, i.e. bins 0 / 1 / 2+ keypoints. ``tercile``: from the pooled ``histogram`` ``(L,)`` of patch
    counts (``histogram[c]`` patches with ``c`` keypoints): with ``q1, q2`` the counts at cumulative fractions 1/3
    and 2/3, bins ``<= q1``, ``(q1, q2]``, ``> q2``; ties at a quantile can leave a bin empty (its ratios are NaN).
    """
    if scheme == "fixed":
        return (1, 2)
    if scheme != "tercile":
        raise ValueError(f"unknown bin scheme {scheme!r}; expected one of {BIN_SCHEMES}")
    _check(histogram, 1, "(L,)", "histogram")
    h = histogram.double()
    if h.sum() <= 0:
        return (1, 2)
    cdf = h.cumsum(0) / h.sum()
    q = [int(torch.nonzero(cdf >= f - 1e-9)[0]) for f in (1 / 3, 2 / 3)]
    return (q[0] + 1, q[1] + 1)


def concentration_bins(counts: Tensor, thresholds: Sequence[int]) -> Tensor:
    """``(B, P)`` keypoint counts -> ``(B, P)`` long bin index ``Σ_k [count >= thresholds[k]]`` in ``0..K-1``."""
    _check(counts, 2, "(B, P)", "counts")
    t = torch.as_tensor(list(thresholds), dtype=counts.dtype, device=counts.device)
    return (counts.unsqueeze(-1) >= t).sum(-1)


def bin_labels(thresholds: Sequence[int]) -> list[str]:
    """Human labels of the bins of :func:`concentration_bins`: ``(1, 2)`` -> ``["0", "1", "2+"]``."""
    lo = [0, *thresholds]
    out = []
    for k, a in enumerate(lo):
        if k == len(lo) - 1:
            out.append(f"{a}+")
        else:
            b = lo[k + 1] - 1
            out.append(str(a) if b == a else (f"{a}-{b}" if b > a else f"{a} (empty)"))
    return out


def _bin_key(label: str) -> str:
    """Column-name-safe key of a bin label: ``"2+"`` -> ``"kp2plus"``, ``"3-5"`` -> ``"kp3to5"``."""
    return "kp" + label.split(" ")[0].replace("+", "plus").replace("-", "to")


def split_attention(attn: Tensor, num_prefix: int, cls_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``(B, h, N, N)`` attention into its patch parts.

    Returns:
        ``patch`` ``(B, h, P, P)``: patch-to-patch attention, each query row renormalised over the patch keys;
        ``cls`` ``(B, h, P)``: the class token's attention over the patches, renormalised (without a class token,
        ``cls_index < 0``: the attention each patch receives, averaged over the patch queries);
        ``to_patches`` ``(B, h, P)``: raw attention mass each patch query sends to patch tokens (``1 - `` its mass
        on prefix tokens).
    """
    _check(attn, 4, "(B, heads, N, N)", "attn")
    if attn.shape[-1] != attn.shape[-2] or not 0 <= num_prefix < attn.shape[-1]:
        raise ValueError(f"attn must be (B, heads, N, N) with N > num_prefix={num_prefix}, got {tuple(attn.shape)}")
    a = attn.float()
    raw = a[:, :, num_prefix:, num_prefix:]  # (B, h, P, P)
    to_patches = raw.sum(-1)
    patch = raw / to_patches.unsqueeze(-1).clamp_min(_EPS)
    cls = a[:, :, cls_index, num_prefix:] if cls_index >= 0 else patch.mean(2)
    cls = cls / cls.sum(-1, keepdim=True).clamp_min(_EPS)
    return patch, cls, to_patches


def bin_flow(patch_attn: Tensor, bins: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Attention flow between concentration bins and what uniform attention would give.

    Args:
        patch_attn: ``(B, h, P, P)`` row-normalised patch-to-patch attention.
        bins: ``(B, P)`` long bin index per patch, in ``0..num_bins-1``.

    Returns:
        ``flow`` ``(B, h, K, K)``: ``flow[a, b] = Σ_{i∈a, j∈b} Ā[i, j]``; ``uniform`` ``(B, K, K)``: ``n_a n_b / P``.

    Example (every query attends to patch 3, the only one in bin 2: ``P / n_2 = 4`` times uniform):
        >>> bins = torch.tensor([[0, 0, 1, 2]])
        >>> attn = torch.zeros(1, 1, 4, 4); attn[..., 3] = 1.0
        >>> flow, uniform = bin_flow(attn, bins, 3)
        >>> (flow / uniform.unsqueeze(1))[0, 0, :, 2].tolist()
        [4.0, 4.0, 4.0]
    """
    _check(patch_attn, 4, "(B, heads, P, P)", "patch_attn")
    _check(bins, 2, "(B, P)", "bins")
    if bins.shape[1] != patch_attn.shape[-1]:
        raise ValueError(f"bins (B, P) has P={bins.shape[1]} but patch_attn has P={patch_attn.shape[-1]}")
    m = F.one_hot(bins.long(), num_bins).to(patch_attn.dtype)  # (B, P, K)
    flow = m.transpose(1, 2).unsqueeze(1) @ patch_attn @ m.unsqueeze(1)  # (B, 1, K, P) @ (B, h, P, P) @ (B, 1, P, K)
    n = m.sum(1)  # (B, K)
    uniform = n.unsqueeze(-1) * n.unsqueeze(-2) / bins.shape[1]
    return flow, uniform


def bin_mass(values: Tensor, bins: Tensor, num_bins: int) -> Tensor:
    """Sum ``(B, ..., P)`` per-patch values within each bin of ``bins`` ``(B, P)``: ``(B, ..., K)``."""
    _check(bins, 2, "(B, P)", "bins")
    m = F.one_hot(bins.long(), num_bins).to(values.dtype)  # (B, P, K)
    lead = values.shape[1:-1]
    out = values.reshape(values.shape[0], -1, values.shape[-1]) @ m  # (B, X, K)
    return out.reshape(values.shape[0], *lead, num_bins)


def kl_divergence(p: Tensor, q: Tensor, eps: float = _EPS) -> Tensor:
    """``KL(p || q) = Σ p log(p / q)`` over the last axis (``0 log 0 = 0``; ``q`` floored at ``eps``)."""
    p, q = torch.broadcast_tensors(p.float(), q.float())
    return torch.where(p > 0, p * (p.clamp_min(eps).log() - q.clamp_min(eps).log()), torch.zeros_like(p)).sum(-1)


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last axis, ties sharing their average rank: ``(..., P)`` -> ``(..., P)``."""
    less = (x.unsqueeze(-2) < x.unsqueeze(-1)).sum(-1)  # [..., i] = #{j: x_j < x_i}
    equal = (x.unsqueeze(-2) == x.unsqueeze(-1)).sum(-1)
    return less.to(torch.float32) + (equal.to(torch.float32) + 1) / 2


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman's rank correlation along the last axis (Pearson of average ranks); NaN where ``x`` or ``y`` is
    constant."""
    x, y = torch.broadcast_tensors(x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    den = (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    return torch.where(den > 0, (rx * ry).sum(-1) / den.clamp_min(_EPS), torch.full_like(den, float("nan")))


def patch_distances(grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """``(P, P)`` Euclidean distances between patch centres of a ``(Gh, Gw)`` grid, in patches (row-major order)."""
    pos = patch_positions(grid, device)  # (P, 2)
    return torch.cdist(pos, pos)


def mean_attention_distance(patch_attn: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, h, P, P)`` row-normalised attention -> ``(B, h)`` attention-weighted distance to the keys, in patches,
    averaged over the patch queries."""
    _check(patch_attn, 4, "(B, heads, P, P)", "patch_attn")
    d = patch_distances(grid, patch_attn.device)
    if d.shape[0] != patch_attn.shape[-1]:
        raise ValueError(f"grid {grid} has {d.shape[0]} patches but patch_attn has P={patch_attn.shape[-1]}")
    return (patch_attn * d).sum(-1).mean(-1)


def attention_entropy(p: Tensor) -> Tensor:
    """Entropy ``-Σ p log p`` in nats over the last axis (``0 log 0 = 0``)."""
    p = p.float()
    return -(p * p.clamp_min(_EPS).log()).sum(-1)


def poor_share(dist: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Share of a per-patch distribution ``(B, P)`` on keypoint-poor (0-keypoint) patches of ``counts`` ``(B, P)``.

    Returns ``(share, uniform)`` ``(B,)``: the mass on poor patches and the fraction of poor patches (what uniform
    attention would give them).
    """
    _check(dist, 2, "(B, P)", "dist")
    if counts.shape != dist.shape:
        raise ValueError(f"counts must match dist (B, P) = {tuple(dist.shape)}, got {tuple(counts.shape)}")
    poor = (counts == 0).to(dist.dtype)
    return (dist * poor).sum(-1) / dist.sum(-1).clamp_min(_EPS), poor.mean(-1)


def input_gradient_attribution(net: nn.Module, images: Tensor, mean: Tensor, std: Tensor,
                               patch_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per-patch input-gradient attribution of the predicted class.

    ``images`` ``(B, C, H, W)`` in [0, 1]; the net sees ``(images - mean) / std``. Returns ``attribution``
    ``(B, P)``: ``Σ_{pixels of patch} Σ_channels |∂ logit_pred / ∂ x|``, normalised to sum 1 per image, and the
    predicted class ``(B,)``. Images are independent in a ViT in eval mode, so one backward of the summed logits
    gives every image's own gradient.
    """
    _check(images, 4, "(B, C, H, W)", "images")
    ph, pw = patch_size
    b, _, h, w = images.shape
    x = images.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = net((x - mean) / std)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if logits.ndim != 2 or logits.shape[1] < 1:
            raise ValueError(f"gradient attribution needs (B, classes) logits, got {tuple(logits.shape)}")
        pred = logits.argmax(-1)
        (grad,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), x)
    g = grad.abs().sum(1).view(b, h // ph, ph, w // pw, pw).sum((2, 4)).flatten(1)  # (B, P)
    return g / g.sum(-1, keepdim=True).clamp_min(_EPS), pred


def prepare_images(images: Tensor, in_chans: int, size: tuple[int, int]) -> Tensor:
    """uint8 or float ``(B, 1|3, h, w)`` -> float ``(B, in_chans, H, W)`` in [0, 1]: grey <-> RGB conversion
    (OpenCV's grey weights; grey is repeated to every channel) and a bilinear resize (antialiased when shrinking)."""
    _check(images, 4, "(B, C, H, W)", "images")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] != in_chans:
        if x.shape[1] == 3 and in_chans == 1:
            x = rgb_to_gray(x)
        elif x.shape[1] == 1:
            x = x.expand(-1, in_chans, -1, -1)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel images to the model's {in_chans} channels")
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size[-1] or x.shape[-2] > size[-2])
    return x.clamp(0.0, 1.0).contiguous()


# ================================================================================================ accumulation
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
        _check(counts, 2, "(B, P)", "counts")
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
            self.kl[li] += kl_divergence(relevance.unsqueeze(1), cls).sum(0).double().cpu()
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
            return torch.where(b > 0, a / b.clamp_min(_EPS), torch.full_like(a, nan))

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


# ================================================================================================ collection
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


def _normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (images - mean) / std


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
        _check(images, 4, "(B, C, H, W)", "images")
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
            logits = net(_normalise(images, mean_t, std_t))
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


# ================================================================================================ model loading
class AnalyzeError(ValueError):
    """A user error (missing checkpoint, bad image folder, incompatible sizes): reported without a traceback."""


@dataclass
class LoadedModel:
    net: nn.Module
    source: str  # "checkpoint" | "timm"
    name: str
    pretrained: str  # "trained checkpoint" | "pretrained (timm)" | RANDOM_INIT line
    random_init: bool
    mean: list[float]
    std: list[float]
    config: dict | None = None
    sift: dict = field(default_factory=dict)
    relevance: dict = field(default_factory=dict)

    @property
    def in_chans(self) -> int:
        return int(self.net.patch_embed.proj.in_channels)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.net.patch_embed.img_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.net.patch_embed.patch_size)


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".ckpt", ".pt", ".pth")) or os.sep in spec or spec.startswith(".")


def _fit_channels(values: Sequence[float], in_chans: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    return [sum(values) / len(values)] * in_chans


def load_checkpoint_model(path: str) -> LoadedModel:
    """A siftguide checkpoint (file or run directory) -> the net built from its config with its trained weights."""
    from hydra.utils import instantiate

    from .export import ExportError, encoder_state_dict, load_run_checkpoint

    try:
        state, config, meta = load_run_checkpoint(path)
    except FileNotFoundError as e:
        raise AnalyzeError(str(e)) from e
    except ExportError as e:
        raise AnalyzeError(str(e)) from e
    if "model" not in config:
        raise AnalyzeError(f"{path}: the checkpoint's config has no 'model' node")
    net = instantiate(config["model"])
    missing, unexpected = net.load_state_dict(encoder_state_dict(state), strict=False)
    if missing or unexpected:
        raise AnalyzeError(f"{path}: the checkpoint's net weights do not fit the model of its config "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    tf = config.get("transform") or {}
    in_chans = int(net.patch_embed.proj.in_channels)
    mean = _fit_channels(tf.get("mean", [0.5]), in_chans)
    std = _fit_channels(tf.get("std", [0.5]), in_chans)
    # the relevance settings the run trained with: top-level `relevance` node, or the older `guidance.target`
    nodes = [config.get("relevance"), (config.get("guidance") or {}).get("target")]
    target = next((n for n in nodes if isinstance(n, dict) and ("sift" in n or "mode" in n)), {})
    sift = dict(target.get("sift") or {})
    relevance = {k: target[k] for k in ("mode", "temperature", "smoothing", "uniform_mix", "splat") if k in target}
    name = f"{config['model'].get('model_name', type(net).__name__)} from {meta['path']} (step {meta['global_step']})"
    return LoadedModel(net, "checkpoint", name, "trained checkpoint", False, mean, std, config, sift, relevance)


def load_timm_model(name: str, model_args: dict, pretrained: bool = True) -> LoadedModel:
    """A timm model by name: pretrained weights when they can be had, else random init (said loudly)."""
    import timm
    from timm.data import resolve_data_config

    note = "pretrained (timm)"
    random_init = False
    net = None
    if pretrained:
        try:
            net = timm.create_model(name, pretrained=True, **model_args)
        except Exception as e:  # noqa: BLE001 - no network, no weights for this name, hub errors: all fall back
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            note = f"{RANDOM_INIT} ({msg})"
    else:
        note = f"{RANDOM_INIT} (--random-init requested)"
    if net is None:
        random_init = True
        print(f"\n{'!' * 100}\n{note}\nThe analysis below describes a randomly initialised {name}, not a trained "
              f"model.\n{'!' * 100}\n", flush=True)
        net = timm.create_model(name, pretrained=False, **model_args)
    in_chans = int(net.patch_embed.proj.in_channels)
    cfg = resolve_data_config(model=net)
    return LoadedModel(net, "timm", name, note, random_init, _fit_channels(cfg["mean"], in_chans),
                       _fit_channels(cfg["std"], in_chans))


# ================================================================================================ image sources
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class FolderImages:
    """Every image file below a folder (sorted), unlabelled."""

    def __init__(self, root: str) -> None:
        p = Path(root)
        if not p.is_dir():
            raise AnalyzeError(f"--images {root!r} is not a folder")
        self.files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise AnalyzeError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
        self.class_names: list[str] | None = None
        self.has_labels = False

    def __len__(self) -> int:
        return len(self.files)

    def load(self, ids: Sequence[int], in_chans: int, size: tuple[int, int]) -> tuple[Tensor, Tensor, list]:
        import numpy as np
        from PIL import Image

        out = []
        for i in ids:
            with Image.open(self.files[i]) as im:
                arr = np.asarray(im.convert("L" if in_chans == 1 else "RGB"))
            x = torch.from_numpy(arr.copy())
            x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
            out.append(prepare_images(x, in_chans, size))
        return torch.cat(out), torch.full((len(ids),), -1), [self.files[i] for i in ids]


class DatasetImages:
    """A siftguide dataset split (Fashion-MNIST, image folder) of ``{"image": uint8, "label"}`` items."""

    def __init__(self, dataset: Any, class_names: Sequence[str] | None, has_labels: bool = True) -> None:
        self.ds, self.class_names, self.has_labels = dataset, list(class_names) if class_names else None, has_labels

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, ids: Sequence[int], in_chans: int, size: tuple[int, int]) -> tuple[Tensor, Tensor, list]:
        if hasattr(self.ds, "images") and hasattr(self.ds, "labels"):  # in-memory tensors: slice
            idx = torch.as_tensor(list(ids))
            x, y = self.ds.images[idx], self.ds.labels[idx]
        else:
            items = [self.ds[i] for i in ids]
            x = torch.stack([it["image"] for it in items])
            y = torch.stack([torch.as_tensor(it["label"]) for it in items])
        return prepare_images(x, in_chans, size), y.long(), list(ids)


def dataset_source(model: LoadedModel, overrides: Sequence[str], split: str) -> DatasetImages:
    """The validation (or test) split of the checkpoint's data config, or Fashion-MNIST, with ``data.KEY=VALUE``
    overrides."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = (model.config or {}).get("data") or {"_target_": "siftguide.data.FashionMNISTDataModule"}
    cfg = OmegaConf.create(dict(node))
    dotlist = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or not key.startswith("data."):
            raise AnalyzeError(f"unrecognised argument {o!r}: data overrides look like data.KEY=VALUE "
                               "(e.g. data.val_size=1000)")
        dotlist.append(o[len("data."):])
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    try:
        dm = instantiate(cfg)
        dm.setup("fit")
    except Exception as e:  # noqa: BLE001 - missing data, bad root: tell the user which config failed
        raise AnalyzeError(f"could not load the images of data config {OmegaConf.to_container(cfg)}: "
                           f"{type(e).__name__}: {e}") from e
    ds = getattr(dm, f"{split}_set", None)
    if ds is None:
        raise AnalyzeError(f"the data module {type(dm).__name__} has no {split} split")
    names = None
    from ..data import FASHION_MNIST_CLASSES, FashionMNISTDataModule

    if isinstance(dm, FashionMNISTDataModule):  # and its generated variants (translated, tint, decoy, ...)
        names = FASHION_MNIST_CLASSES
    elif hasattr(ds, "ds") and hasattr(ds.ds, "classes"):
        names = ds.ds.classes
    return DatasetImages(ds, names, has_labels=bool(getattr(dm, "labels", True)) or split != "train")


def _batches(source: Any, ids: Sequence[int], batch_size: int, in_chans: int,
             size: tuple[int, int]) -> Iterator[dict]:
    for s in range(0, len(ids), batch_size):
        x, y, index = source.load(ids[s: s + batch_size], in_chans, size)
        yield {"image": x, "label": y if bool((y >= 0).any()) else None, "index": index}


# ================================================================================================ outputs
def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def metric_rows(res: dict, layers: Sequence[int], head_mean: bool = False) -> list[dict[str, Any]]:
    """One dict per layer/head (or per layer, heads averaged) with every number of :meth:`InterrelationStats.result`."""
    keys = [_bin_key(lb) for lb in res["labels"]]
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


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ratio_image(ax, values, title: str, annotate: bool, xlabels=None, ylabels=None):
    """Heat map of ratios on a log2 scale centred on 1 (uniform), annotated with the ratios."""
    import numpy as np

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
    import numpy as np

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
    import numpy as np

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


# ================================================================================================ the analysis
def _class_name(c: int, names: Sequence[str] | None) -> str:
    if c < 0:
        return "-"
    if names and c < len(names):
        return str(names[c])
    return str(c)


def _imagenet_names(num_classes: int) -> list[str] | None:
    """Short ImageNet-1k class names for timm classifiers with 1000 outputs (None otherwise)."""
    if num_classes != 1000:
        return None
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    except Exception:  # noqa: BLE001 - older timm: numeric class ids
        return None


RANK_BY = ("excess", "share")


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
            "rank": 0, "index": col.index[i], "label": lab, "label_name": _class_name(lab, label_names),
            "pred": pred, "pred_name": _class_name(pred, pred_names),
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

        name = _class_name(c, label_names if by == "label" else pred_names)
        row = {"class": c, "name": name, "images": len(rs),
               "accuracy": (sum(r["correct"] for r in rs) / len(rs)) if rs[0]["correct"] != "" else "",
               "poor_patch_frac": m("poor_patch_frac"), "attn_poor_share": m("attn_poor_share"),
               "attn_poor_excess": m("attn_poor_excess")}
        if g_share is not None:
            row["grad_poor_share"], row["grad_poor_excess"] = m("grad_poor_share"), m("grad_poor_excess")
        classes.append(row)
    classes.sort(key=lambda r: -r[key])
    return images, classes


def analyze(model: LoadedModel, source: Any, out: Path, *, num_images: int = 512, batch_size: int = 64,
            bins: str = "fixed", layer: int = -1, head: int | None = None, spurious: bool | None = None,
            overlays: int = 6, top: int = 6, device: str = "cpu", command: str = "",
            relevance_mode: str | None = None, max_keypoints: int | None = None, source_desc: str = "",
            progress: bool = True, rank_by: str = "excess") -> dict[str, Any]:
    """Run the analysis of ``model`` on ``source`` and write every output into ``out``; returns a summary."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    net = model.net.eval().requires_grad_(False)
    size, patch = model.img_size, model.patch_size
    if size[0] % patch[0] or size[1] % patch[1]:
        raise AnalyzeError(f"patch size {patch[0]}x{patch[1]} does not divide the image size {size[0]}x{size[1]}")
    grid = (size[0] // patch[0], size[1] // patch[1])
    ids = list(range(min(num_images, len(source))))
    if not ids:
        raise AnalyzeError("no images to analyse (empty source or --num-images 0)")
    spurious = source.has_labels if spurious is None else spurious
    sift = dict(model.sift)
    if max_keypoints is not None:
        sift["max_keypoints"] = max_keypoints
    relevance = dict(model.relevance)
    if relevance_mode is not None:
        relevance["mode"] = relevance_mode
    has_head = getattr(net, "num_classes", 0) > 0
    t0 = time.time()
    nb = math.ceil(len(ids) / batch_size)
    with tqdm(total=nb, desc="analyse", unit="batch", disable=not progress) as bar:
        col = collect(net, _batches(source, ids, batch_size, model.in_chans, size), mean=model.mean, std=model.std,
                      sift=sift, relevance=relevance, layer=layer, head=head, gradients=spurious and has_head,
                      device=device, progress=bar)
    elapsed = time.time() - t0
    stats = col.stats
    layers = stats.layers
    thresholds = concentration_thresholds(stats.histogram(), bins)
    res = stats.result(thresholds)
    rows = metric_rows(res, layers)
    layer_rows = metric_rows(res, layers, head_mean=True)
    _write_csv(out / "metrics.csv", rows)
    _write_csv(out / "metrics_layers.csv", layer_rows)
    keys = [_bin_key(lb) for lb in res["labels"]]
    plot_heatmaps(rows, layers, stats.num_heads, keys, res["labels"], out / "heatmaps.png")
    plot_interrelation(res, layers, out / "interrelation.png")

    sel_layer = layers[layer]
    head_desc = "head mean" if head is None else f"head {head}"
    attn_title = ("CLS" if stats.cls_index >= 0 else "mean received") + f" attn, layer {sel_layer}, {head_desc}"
    attn_all, counts_all = col.cat("attn"), col.cat("counts")
    grad_all = col.cat("grad") if col.grad else None

    def overlay(sel: list[int], path: Path, titles: list[str]) -> None:
        x, _, _ = source.load([ids[i] for i in sel], model.in_chans, size)
        kp = detect_keypoints(x if x.shape[1] in (1, 3) else x.mean(1, keepdim=True), **sift)
        plot_overlays(x, kp, attn_all[sel], counts_all[sel], grid, titles, attn_title, path,
                      grad_all[sel] if grad_all is not None else None)

    names = source.class_names
    pred_names = names if model.source == "checkpoint" and not isinstance(source, FolderImages) else \
        _imagenet_names(getattr(net, "num_classes", 0))
    n_ov = min(overlays, len(ids))
    if n_ov:
        sel = list(range(n_ov))
        titles = [(Path(col.index[i]).name if isinstance(col.index[i], str) else f"#{col.index[i]}")
                  + f" {_class_name(col.labels[i], names)}" for i in sel]
        overlay(sel, out / "overlays.png", titles)
    summary: dict[str, Any] = dict(images=len(ids), grid=grid, bins=bins, thresholds=thresholds, labels=res["labels"],
                                   seconds=elapsed, random_init=model.random_init, out=str(out))
    spur_md = ""
    if spurious:
        by = "label" if source.has_labels and any(v >= 0 for v in col.labels) else "pred"
        # a timm name's classes (ImageNet) are not the data's: predictions are kept, accuracy is not computed
        labels_match = model.source == "checkpoint" and not isinstance(source, FolderImages)
        img_rows, cls_rows = spurious_tables(col, names, pred_names, by, labels_match, rank_by)
        _write_csv(out / "spurious_images.csv", img_rows)
        _write_csv(out / "spurious_classes.csv", cls_rows)
        pos = {ix: i for i, ix in enumerate(col.index)}
        k = min(top, len(img_rows))
        sel = [pos[r["index"]] for r in img_rows[:k]]
        titles = [f"#{r['rank']} {r['label_name'][:14]} → {r['pred_name'][:14]}\npoor-patch share "
                  f"{r['attn_poor_share']:.2f} ({r['attn_poor_excess']:+.2f})" for r in img_rows[:k]]
        if sel:
            overlay(sel, out / "spurious_overlays.png", titles)
        spur_md = _spurious_markdown(img_rows, cls_rows, by, grad_all is not None, has_head, sel_layer, head_desc,
                                     k, rank_by, stats.cls_index >= 0)
        summary["spurious_classes"] = cls_rows
    _write_report(out, model, res, layers, layer_rows, rows, summary, command, source_desc, attn_title,
                  stats.cls_index >= 0, spur_md, relevance, sift, grad_all is not None)
    return summary


def _spurious_markdown(img_rows, cls_rows, by, has_grad, has_head, layer, head_desc, k, rank_by, has_cls) -> str:
    g = has_grad
    lines = ["## Spurious-correlation candidates", "",
             f"Share of the {'class token' if has_cls else 'mean received'} attention (layer {layer}, {head_desc}) "
             "on keypoint-poor (0-keypoint) "
             "patches, per image; `excess` = share minus the fraction of poor patches (what uniform attention "
             "would give them). "
             + ("Second signal: the share of the input-gradient attribution |∂ logit_pred / ∂ x| on those patches."
                if g else ("No input-gradient signal: the model has no classifier head." if not has_head else "")),
             f"Classes are grouped by {'true label' if by == 'label' else 'predicted class (no labels)'} and "
             f"ranked by the attention {rank_by}"
             + (" (the raw share ranks images with few keypoints first: an image without keypoints has share 1)"
                if rank_by == "excess" else "")
             + "; full tables in `spurious_classes.csv` and `spurious_images.csv`.", ""]
    head = ["class", "images", "accuracy", "poor patch frac", "attn poor share", "attn excess"]
    if g:
        head += ["grad poor share", "grad excess"]
    rows = []
    for r in cls_rows[:10]:
        row = [r["name"], r["images"], r["accuracy"], r["poor_patch_frac"], r["attn_poor_share"],
               r["attn_poor_excess"]]
        if g:
            row += [r["grad_poor_share"], r["grad_poor_excess"]]
        rows.append(row)
    lines += [f"Most affected classes (highest attention {rank_by} on keypoint-poor patches):", "",
              _md_table(head, rows), ""]
    other = "share" if rank_by == "excess" else "excess"
    top_other = sorted(cls_rows, key=lambda r: -r[f"attn_poor_{other}"])[:5]
    lines += [f"By attention {other} instead: "
              + ", ".join(f"{r['name']} ({r[f'attn_poor_{other}']:.3f})" for r in top_other) + ".", ""]
    head = ["rank", "image", "label", "prediction", "keypoints", "poor patch frac", "attn poor share", "attn excess"]
    if g:
        head += ["grad poor share"]
    rows = []
    for r in img_rows[:max(k, 10)]:
        row = [r["rank"], r["index"] if not isinstance(r["index"], str) else Path(r["index"]).name, r["label_name"],
               r["pred_name"], r["keypoints"], r["poor_patch_frac"], r["attn_poor_share"], r["attn_poor_excess"]]
        if g:
            row += [r["grad_poor_share"]]
        rows.append(row)
    lines += ["Top images:", "", _md_table(head, rows), "", "![top images](spurious_overlays.png)", ""]
    return "\n".join(lines)


def _write_report(out: Path, model: LoadedModel, res: dict, layers, layer_rows, rows, summary, command: str,
                  source_desc: str, attn_title: str, has_cls: bool, spur_md: str, relevance: dict, sift: dict,
                  has_grad: bool) -> None:
    labels, keys = res["labels"], [_bin_key(lb) for lb in res["labels"]]
    lines = ["# SIFT-weighted patch interrelation analysis", ""]
    if model.random_init:
        lines += [f"> **{model.pretrained}**", "> The numbers below describe a randomly initialised network.", ""]
    ppi = ", ".join(f"{lb}: {float(v):.1f}" for lb, v in zip(labels, res["patches_per_image"]))
    lines += [
        f"- command: `{command}`" if command else "- command: (Python API)",
        f"- model: `{model.name}` ({model.source}); weights: {model.pretrained}",
        f"- images: {summary['images']} from {source_desc}; model input {model.img_size[0]}x{model.img_size[1]}, "
        f"{model.in_chans} channel(s), patches {model.patch_size[0]}x{model.patch_size[1]} "
        f"(grid {summary['grid'][0]}x{summary['grid'][1]}); normalisation mean {model.mean} std {model.std}",
        f"- concentration bins (keypoints per patch, {summary['bins']}): {', '.join(labels)}; mean patches per "
        f"image: {ppi}",
        f"- SIFT: {sift or 'defaults'}; relevance: {relevance or 'count (default)'}",
        f"- class token: {'yes' if has_cls else 'no (CLS columns use the mean attention each patch receives)'}",
        f"- time: {summary['seconds']:.1f} s",
        "",
        "Ratios compare with uniform attention (1 = uniform, > 1 = more than uniform). `recv`: mean attention a "
        "patch of the bin receives from the patch queries; `send`: share of a patch's attention that goes to patch "
        "tokens rather than prefix tokens; `CLS`: class token's attention per patch of the bin; `rich→poor`: flow "
        f"from {labels[-1]}-keypoint patches to {labels[0]}-keypoint patches; KL(relevance ‖ CLS) in nats; "
        "Spearman between SIFT relevance and CLS attention per image; distance in patches. Definitions in "
        "`siftguide/analysis/analyze.py`.",
        "",
        "## Per-layer summary (heads averaged)",
        "",
    ]
    head = (["layer"] + [f"recv {lb}" for lb in labels] + [f"CLS {lb}" for lb in labels]
            + ["rich→poor", "poor→rich", "KL", "Spearman", "distance", "entropy", "prefix share"])
    body = [[r["layer"]] + [r[f"recv_{k}"] for k in keys] + [r[f"cls_ratio_{k}"] for k in keys]
            + [r["rich_to_poor"], r["poor_to_rich"], r["kl"], r["spearman"], r["distance"], r["entropy"],
               r["prefix_share"]] for r in layer_rows]
    lines += [_md_table(head, body), "", "![layer x head heat maps](heatmaps.png)", "",
              "![bin interrelation per layer](interrelation.png)", "", "## Per layer and head", ""]
    head = (["layer", "head"] + [f"recv {lb}" for lb in labels] + [f"CLS share {lb}" for lb in labels]
            + ["rich→poor", "poor→rich", "KL", "Spearman", "distance", "entropy"])
    body = [[r["layer"], r["head"]] + [r[f"recv_{k}"] for k in keys] + [r[f"cls_share_{k}"] for k in keys]
            + [r["rich_to_poor"], r["poor_to_rich"], r["kl"], r["spearman"], r["distance"], r["entropy"]]
            for r in rows]
    lines += [_md_table(head, body), "", "All numbers per layer/head: `metrics.csv` (heads averaged: "
              "`metrics_layers.csv`).", "", "## Overlays", "",
              f"Columns: the image with its SIFT keypoints (red); {attn_title} (colour scale 0 to its maximum); "
              "keypoints per patch" + ("; |input gradient| of the predicted logit per patch." if has_grad else "."),
              "",
              "![overlays](overlays.png)", ""]
    if spur_md:
        lines += [spur_md]
    (out / "report.md").write_text("\n".join(lines) + "\n")


# ================================================================================================ command line
def _parse_head(v: str) -> int | None:
    if v.lower() in ("mean", "all", "none"):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--head must be an integer or 'mean', got {v!r}") from None


def _parse_model_arg(v: str) -> tuple[str, Any]:
    import yaml

    if "=" not in v:
        raise argparse.ArgumentTypeError(f"--model-arg must look like KEY=VALUE, got {v!r}")
    k, val = v.split("=", 1)
    return k, yaml.safe_load(val)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m siftguide.analysis.analyze",
        description="SIFT-weighted patch interrelation analysis of a ViT's self-attention: how each layer and head "
                    "distributes attention across patches of high and low SIFT keypoint concentration, agreement "
                    "with SIFT relevance, and spurious-correlation candidates. Writes metrics.csv, report.md and "
                    "PNGs into --out.")
    p.add_argument("model", metavar="MODEL",
                   help="a siftguide checkpoint (.ckpt file or run directory) or a timm model name")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                   help="overrides of the data config (checkpoint's, else Fashion-MNIST), e.g. data.val_size=1000")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", help="a folder of image files (resized to the model's input size) instead of the "
                                    "data config's validation split")
    p.add_argument("--split", default="val", choices=("val", "test", "train"), help="data split (default val)")
    p.add_argument("--num-images", type=int, default=512, help="images analysed (default 512)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bins", default="fixed", choices=BIN_SCHEMES,
                   help="concentration bins: fixed = 0 / 1 / 2+ keypoints per patch; tercile = terciles of the "
                        "pooled counts")
    p.add_argument("--layer", type=int, default=-1, help="block of the overlays and spurious signal (default -1)")
    p.add_argument("--head", type=_parse_head, default=None, help="head of the overlays and spurious signal "
                                                                  "(default: mean over heads)")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--spurious", dest="spurious", action="store_true", default=None,
                    help="spurious-correlation ranking (default: on when the images have labels)")
    sp.add_argument("--no-spurious", dest="spurious", action="store_false")
    p.add_argument("--rank-by", choices=RANK_BY, default="excess",
                   help="spurious ranking: excess = attention share on 0-keypoint patches minus their fraction "
                        "(default), share = the raw share")
    p.add_argument("--overlays", type=int, default=6, help="images in overlays.png (default 6)")
    p.add_argument("--top", type=int, default=6, help="images in spurious_overlays.png (default 6)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size: timm names are created at this size; checkpoints must match their own")
    p.add_argument("--model-arg", type=_parse_model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs for a timm name (e.g. depth=6), repeatable")
    p.add_argument("--random-init", action="store_true", help="timm names: do not try pretrained weights")
    p.add_argument("--relevance-mode", choices=RELEVANCE_MODES, default=None,
                   help="SIFT relevance for KL/Spearman (default: the checkpoint's, else count)")
    p.add_argument("--max-keypoints", type=int, default=None, help="SIFT keypoints kept per image")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def _load_model(args, parser) -> LoadedModel:
    import timm

    spec = args.model
    if os.path.exists(spec):
        if args.model_arg:
            parser.error("--model-arg only applies to timm model names, not to checkpoints")
        model = load_checkpoint_model(spec)
    elif _looks_like_path(spec) or not timm.is_model(spec):
        hint = ("checkpoint not found: " + spec) if _looks_like_path(spec) else (
            f"MODEL {spec!r} is neither an existing checkpoint nor a timm model name (see timm.list_models())")
        raise AnalyzeError(hint)
    else:
        kwargs = dict(args.model_arg)
        if args.img_size is not None:
            kwargs.setdefault("img_size", args.img_size)
        patch = kwargs.get("patch_size")
        if args.img_size is not None and patch is not None and args.img_size % int(patch):
            raise AnalyzeError(f"patch size {patch} does not divide the image size {args.img_size}")
        try:
            model = load_timm_model(spec, kwargs, pretrained=not args.random_init)
        except AnalyzeError:
            raise
        except Exception as e:  # noqa: BLE001 - bad kwargs for this architecture
            raise AnalyzeError(f"could not create timm model {spec!r} with {kwargs}: {type(e).__name__}: {e}") from e
    if not hasattr(model.net, "blocks") or not hasattr(model.net, "patch_embed"):
        raise AnalyzeError(f"{spec}: not a timm VisionTransformer-style model (needs .blocks and .patch_embed)")
    try:
        AttentionCapture(model.net, layers=list(range(len(model.net.blocks))))
    except TypeError as e:  # an attention module whose probabilities cannot be captured exactly
        raise AnalyzeError(f"{spec}: {e}") from e
    size, patch = model.img_size, model.patch_size
    if args.img_size is not None and tuple([args.img_size] * 2) != size:
        raise AnalyzeError(f"image size mismatch: the model takes {size[0]}x{size[1]} images, got --img-size "
                           f"{args.img_size}" + (" (a checkpoint's input size is fixed by its config)"
                                                 if model.source == "checkpoint" else ""))
    if size[0] % patch[0] or size[1] % patch[1]:
        raise AnalyzeError(f"patch size {patch[0]}x{patch[1]} does not divide the image size {size[0]}x{size[1]}")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; user errors exit with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # data.KEY=VALUE overrides may follow the options
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m siftguide.analysis.analyze " + " ".join(shlex.quote(a) for a in argv_list)
    try:
        if args.num_images < 1 or args.batch_size < 1:
            raise AnalyzeError("--num-images and --batch-size must be >= 1")
        model = _load_model(args, parser)
        depth = len(model.net.blocks)
        if not -depth <= args.layer < depth:
            raise AnalyzeError(f"--layer {args.layer} out of range for a model with {depth} blocks")
        heads = model.net.blocks[0].attn.num_heads
        if args.head is not None and not 0 <= args.head < heads:
            raise AnalyzeError(f"--head {args.head} out of range for a model with {heads} heads")
        if args.images:
            if args.overrides:
                raise AnalyzeError("data overrides do not apply with --images")
            source: Any = FolderImages(args.images)
            desc = f"folder `{args.images}` ({len(source)} files)"
        else:
            source = dataset_source(model, args.overrides, args.split)
            node = (model.config or {}).get("data") or {}
            desc = (f"the {args.split} split of {node.get('_target_', 'siftguide.data.FashionMNISTDataModule')}"
                    + (" (the checkpoint's data config)" if model.config else " (default data)"))
            if args.overrides:
                desc += " with " + " ".join(args.overrides)
        summary = analyze(model, source, Path(args.out), num_images=args.num_images, batch_size=args.batch_size,
                          bins=args.bins, layer=args.layer, head=args.head, spurious=args.spurious,
                          overlays=args.overlays, top=args.top, device=args.device, command=command,
                          relevance_mode=args.relevance_mode, max_keypoints=args.max_keypoints, source_desc=desc,
                          progress=not args.no_progress, rank_by=args.rank_by)
    except AnalyzeError as e:
        parser.error(str(e))
    if model.random_init:
        print(model.pretrained)
    print(f"analysed {summary['images']} images in {summary['seconds']:.1f} s; wrote {summary['out']}/report.md, "
          "metrics.csv, heatmaps.png, interrelation.png, overlays.png"
          + (", spurious_images.csv, spurious_classes.csv, spurious_overlays.png" if "spurious_classes" in summary
             else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
