"""Per-image measures of a ViT's attention against SIFT keypoints: pure batched tensor functions.

Patches carry different *semantic concentration*: the number of SIFT keypoints that fall in them (Wu et al. 2022,
arXiv 2211.08543). These functions measure, per image and head, how attention flows between patches of high and low
concentration and how it agrees with the SIFT relevance map;
:class:`~siftguide.analysis.interrelation.InterrelationStats` sums them over an image set.

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
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..guidance.attention import kl_divergence  # the package's one KL (re-exported: kl_divergence(p, q, eps))
from ..relevance import patch_positions

__all__ = [
    "BIN_SCHEMES", "EPS", "check_shape", "concentration_thresholds", "concentration_bins", "bin_labels", "bin_key",
    "split_attention", "bin_flow", "bin_mass", "kl_divergence", "average_ranks", "spearman", "patch_distances",
    "mean_attention_distance", "attention_entropy", "poor_share", "input_gradient_attribution",
]

BIN_SCHEMES = ("fixed", "tercile")

EPS = 1e-12


def check_shape(t: Tensor, ndim: int, shape: str, name: str) -> None:
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
    check_shape(histogram, 1, "(L,)", "histogram")
    h = histogram.double()
    if h.sum() <= 0:
        return (1, 2)
    cdf = h.cumsum(0) / h.sum()
    q = [int(torch.nonzero(cdf >= f - 1e-9)[0]) for f in (1 / 3, 2 / 3)]
    return (q[0] + 1, q[1] + 1)


def concentration_bins(counts: Tensor, thresholds: Sequence[int]) -> Tensor:
    """``(B, P)`` keypoint counts -> ``(B, P)`` long bin index ``Σ_k [count >= thresholds[k]]`` in ``0..K-1``."""
    check_shape(counts, 2, "(B, P)", "counts")
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


def bin_key(label: str) -> str:
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
    check_shape(attn, 4, "(B, heads, N, N)", "attn")
    if attn.shape[-1] != attn.shape[-2] or not 0 <= num_prefix < attn.shape[-1]:
        raise ValueError(f"attn must be (B, heads, N, N) with N > num_prefix={num_prefix}, got {tuple(attn.shape)}")
    a = attn.float()
    raw = a[:, :, num_prefix:, num_prefix:]  # (B, h, P, P)
    to_patches = raw.sum(-1)
    patch = raw / to_patches.unsqueeze(-1).clamp_min(EPS)
    cls = a[:, :, cls_index, num_prefix:] if cls_index >= 0 else patch.mean(2)
    cls = cls / cls.sum(-1, keepdim=True).clamp_min(EPS)
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
    check_shape(patch_attn, 4, "(B, heads, P, P)", "patch_attn")
    check_shape(bins, 2, "(B, P)", "bins")
    if bins.shape[1] != patch_attn.shape[-1]:
        raise ValueError(f"bins (B, P) has P={bins.shape[1]} but patch_attn has P={patch_attn.shape[-1]}")
    m = F.one_hot(bins.long(), num_bins).to(patch_attn.dtype)  # (B, P, K)
    flow = m.transpose(1, 2).unsqueeze(1) @ patch_attn @ m.unsqueeze(1)  # (B, 1, K, P) @ (B, h, P, P) @ (B, 1, P, K)
    n = m.sum(1)  # (B, K)
    uniform = n.unsqueeze(-1) * n.unsqueeze(-2) / bins.shape[1]
    return flow, uniform


def bin_mass(values: Tensor, bins: Tensor, num_bins: int) -> Tensor:
    """Sum ``(B, ..., P)`` per-patch values within each bin of ``bins`` ``(B, P)``: ``(B, ..., K)``."""
    check_shape(bins, 2, "(B, P)", "bins")
    m = F.one_hot(bins.long(), num_bins).to(values.dtype)  # (B, P, K)
    lead = values.shape[1:-1]
    out = values.reshape(values.shape[0], -1, values.shape[-1]) @ m  # (B, X, K)
    return out.reshape(values.shape[0], *lead, num_bins)


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last axis, ties sharing their average rank: ``(..., P)`` -> ``(..., P)``."""
    less = (x.unsqueeze(-2) < x.unsqueeze(-1)).sum(-1)  # [..., i] = #{j: x_j < x_i}
    equal = (x.unsqueeze(-2) == x.unsqueeze(-1)).sum(-1)
    return less.to(torch.float32) + (equal.to(torch.float32) + 1) / 2


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman's rank correlation along the last axis (Pearson of average ranks); NaN where ``x`` or ``y`` is
    constant.

    Kept instead of ``torchmetrics.functional.spearman_corrcoef``, which agrees on every non-constant row (ties
    included, tested) but differs where it matters here: it returns 0, not NaN, for a constant row (the analysis
    counts NaN to skip images with a constant relevance map), divides by ``std * std + 1e-6``, works on columns of
    a 2-D input only, and ranks each column in a Python loop (about 10^4 calls per batch of the analysis); this
    function ranks every row of any ``(..., P)`` batch at once."""
    x, y = torch.broadcast_tensors(x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    den = (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    return torch.where(den > 0, (rx * ry).sum(-1) / den.clamp_min(EPS), torch.full_like(den, float("nan")))


def patch_distances(grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """``(P, P)`` Euclidean distances between patch centres of a ``(Gh, Gw)`` grid, in patches (row-major order)."""
    pos = patch_positions(grid, device)  # (P, 2)
    return torch.cdist(pos, pos)


def mean_attention_distance(patch_attn: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, h, P, P)`` row-normalised attention -> ``(B, h)`` attention-weighted distance to the keys, in patches,
    averaged over the patch queries."""
    check_shape(patch_attn, 4, "(B, heads, P, P)", "patch_attn")
    d = patch_distances(grid, patch_attn.device)
    if d.shape[0] != patch_attn.shape[-1]:
        raise ValueError(f"grid {grid} has {d.shape[0]} patches but patch_attn has P={patch_attn.shape[-1]}")
    return (patch_attn * d).sum(-1).mean(-1)


def attention_entropy(p: Tensor) -> Tensor:
    """Entropy ``-Σ p log p`` in nats over the last axis (``0 log 0 = 0``)."""
    p = p.float()
    return -(p * p.clamp_min(EPS).log()).sum(-1)


def poor_share(dist: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Share of a per-patch distribution ``(B, P)`` on keypoint-poor (0-keypoint) patches of ``counts`` ``(B, P)``.

    Returns ``(share, uniform)`` ``(B,)``: the mass on poor patches and the fraction of poor patches (what uniform
    attention would give them).
    """
    check_shape(dist, 2, "(B, P)", "dist")
    if counts.shape != dist.shape:
        raise ValueError(f"counts must match dist (B, P) = {tuple(dist.shape)}, got {tuple(counts.shape)}")
    poor = (counts == 0).to(dist.dtype)
    return (dist * poor).sum(-1) / dist.sum(-1).clamp_min(EPS), poor.mean(-1)


def input_gradient_attribution(net: nn.Module, images: Tensor, mean: Tensor, std: Tensor,
                               patch_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per-patch input-gradient attribution of the predicted class.

    ``images`` ``(B, C, H, W)`` in [0, 1]; the net sees ``(images - mean) / std``. Returns ``attribution``
    ``(B, P)``: ``Σ_{pixels of patch} Σ_channels |∂ logit_pred / ∂ x|``, normalised to sum 1 per image, and the
    predicted class ``(B,)``. Images are independent in a ViT in eval mode, so one backward of the summed logits
    gives every image's own gradient.
    """
    check_shape(images, 4, "(B, C, H, W)", "images")
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
    return g / g.sum(-1, keepdim=True).clamp_min(EPS), pred
