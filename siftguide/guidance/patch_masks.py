"""Batched patch masks for masked-patch prediction (iBOT, DINOv2, AttMask) on a ``(Gh, Gw)`` patch grid.

Every generator returns ``mask (B, P)`` bool, ``P = Gh * Gw`` in row-major (timm token) order, True = masked, with
exactly ``counts[b]`` masked patches in row ``b``, ``counts (B,)`` an integer tensor (0 allowed; values outside
``0..P`` saturate: checking them would need a host sync). Shapes are static and nothing loops over images, so they
run on the batch's device inside a training step; pass a ``torch.Generator`` on that device for reproducible draws.

* :func:`draw_mask_counts`: how many patches each image hides (half the images none, as iBOT / DINOv2);
* :func:`masks_from_scores`: the ``counts[b]`` highest-scoring patches (all others build on it);
* :func:`random_patch_mask`: uniform random subsets;
* :func:`block_patch_mask`: rectangles, a batched approximation of iBOT's block-wise masking;
* :func:`relevance_patch_mask`: AttMask-High / -Hint on a relevance map (e.g. SIFT keypoint density).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["draw_mask_counts", "masks_from_scores", "random_patch_mask", "block_patch_mask", "relevance_patch_mask"]


def draw_mask_counts(batch: int, num_patches: int, ratio_min: float, ratio_max: float, masked_share: float = 0.5,
                     generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """``counts (B,)`` long: each image is masked with probability ``masked_share``, then hides
    ``round(ratio * P)`` patches with ``ratio ~ U[ratio_min, ratio_max]`` (independent per image); the others 0.

    Needs ``0 < ratio_min <= ratio_max < 1`` and ``0 <= masked_share <= 1`` (iBOT / DINOv2: 0.1 to 0.5, 0.5).
    """
    if batch < 1 or num_patches < 1:
        raise ValueError(f"draw_mask_counts needs batch >= 1 and num_patches >= 1, got {batch} and {num_patches}")
    if not 0.0 < ratio_min <= ratio_max < 1.0:
        raise ValueError(f"draw_mask_counts needs 0 < ratio_min <= ratio_max < 1, got ratio_min={ratio_min}, "
                         f"ratio_max={ratio_max}")
    if not 0.0 <= masked_share <= 1.0:
        raise ValueError(f"draw_mask_counts masked_share must be in [0, 1], got {masked_share}")
    u = torch.rand(2, batch, generator=generator, device=device)
    ratio = ratio_min + (ratio_max - ratio_min) * u[0]
    counts = torch.round(ratio * num_patches).long()
    return torch.where(u[1] < masked_share, counts, torch.zeros_like(counts))


def masks_from_scores(scores: Tensor, counts: Tensor) -> Tensor:
    """``mask (B, P)``: True at the ``counts[b]`` highest ``scores[b] (B, P)`` of each row (ties: lower index
    first). Each patch's rank comes from one stable argsort; ``mask = rank < counts[:, None]``."""
    if scores.dim() != 2:
        raise ValueError(f"masks_from_scores expects scores of shape (B, P), got {tuple(scores.shape)}")
    counts = _check_counts(counts, scores.shape[0])
    return _ranks(scores) < counts.to(scores.device).unsqueeze(1)


def random_patch_mask(counts: Tensor, grid: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """``mask (B, P)``: ``counts[b]`` patches drawn uniformly without replacement, on ``counts``' device."""
    gh, gw = _check_grid(grid)
    counts = _check_counts(counts)
    scores = torch.rand(counts.shape[0], gh * gw, generator=generator, device=counts.device)
    return masks_from_scores(scores, counts)


def block_patch_mask(counts: Tensor, grid: tuple[int, int], generator: torch.Generator | None = None,
                     min_aspect: float = 0.3, max_blocks: int = 8, min_block_patches: int = 4) -> Tensor:
    """``mask (B, P)``: ``counts[b]`` patches gathered in rectangles (iBOT / BEiT block-wise masking, batched).

    iBOT's generator loops per image, drawing rectangles of area ``U[4, remaining]`` patches and log-uniform aspect
    ratio in ``[min_aspect, 1 / min_aspect]`` at random places until ``counts[b]`` patches are covered. Here every
    image draws ``max_blocks`` such rectangles at once (area ``U[min_block_patches, max(min_block_patches,
    counts[b])]``, sides rounded and clipped to the grid) and each patch is scored by the first rectangle covering
    it: ``(max_blocks - k) + (1 - d) / 2`` for rectangle ``k`` (``d`` in [0, 1): its normalised Chebyshev distance
    to the rectangle's centre), uncovered patches ``< 0.01`` (noise, which also breaks ties). The ``counts[b]``
    best go (:func:`masks_from_scores`): whole rectangles in drawing order, the last one partly, filled from its
    centre outward. Approximation: rectangles may overlap, the last one is cut to the exact count (iBOT instead
    rejects a rectangle that overshoots), and when the rectangles cover fewer than ``counts[b]`` patches the rest
    are scattered at random (rare with the defaults: the first rectangle alone covers half the count on average).
    """
    gh, gw = _check_grid(grid)
    counts = _check_counts(counts)
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"block_patch_mask min_aspect must be in (0, 1], got {min_aspect}")
    if max_blocks < 1 or min_block_patches < 1:
        raise ValueError(f"block_patch_mask needs max_blocks >= 1 and min_block_patches >= 1, got {max_blocks} and "
                         f"{min_block_patches}")
    b, k, dev = counts.shape[0], max_blocks, counts.device
    u = torch.rand(4, b, k, generator=generator, device=dev)
    noise = torch.rand(b, gh * gw, generator=generator, device=dev)
    lo = float(min_block_patches)
    area = lo + (counts.float().clamp_min(lo).unsqueeze(1) - lo) * u[0]  # (B, K)
    log_aspect = math.log(min_aspect) * (1.0 - 2.0 * u[1])  # log-uniform aspect h / w in [min_aspect, 1/min_aspect]
    h = torch.sqrt(area * log_aspect.exp()).round().clamp(1, gh)
    w = torch.sqrt(area / log_aspect.exp()).round().clamp(1, gw)
    top = (u[2] * (gh - h + 1)).floor()  # 0 .. gh - h
    left = (u[3] * (gw - w + 1)).floor()
    ys = torch.arange(gh, device=dev, dtype=torch.float32)
    xs = torch.arange(gw, device=dev, dtype=torch.float32)
    dy = (ys - (top + (h - 1) / 2).unsqueeze(-1)).abs() / (h / 2).unsqueeze(-1)  # (B, K, Gh), < 1 inside
    dx = (xs - (left + (w - 1) / 2).unsqueeze(-1)).abs() / (w / 2).unsqueeze(-1)  # (B, K, Gw)
    d = torch.maximum(dy.unsqueeze(-1), dx.unsqueeze(-2))  # (B, K, Gh, Gw)
    first = torch.arange(k, 0, -1, device=dev, dtype=torch.float32).view(1, k, 1, 1)  # earlier rectangles higher
    score = torch.where(d < 1, first + (1 - d) / 2, 0.0).amax(1).flatten(1)  # (B, P): >= 1 where covered
    return masks_from_scores(score + 0.01 * noise, counts)


def relevance_patch_mask(relevance: Tensor, counts: Tensor, hints: float = 0.0,
                         generator: torch.Generator | None = None) -> Tensor:
    """``mask (B, P)``: AttMask (Kakogeorgiou et al. 2022) on ``relevance (B, Gh, Gw)`` or ``(B, P)``.

    ``hints = 0`` (AttMask-High): the ``counts[b]`` most relevant patches (ties broken at random by noise far
    below any relevance gap). ``hints > 0`` (AttMask-Hint): ``H = round(hints * counts[b])`` patches drawn
    uniformly among the ``min(round(hints * P), counts[b])`` most relevant are revealed (left visible), and the
    ``H`` next-ranked patches (ranks ``counts[b] .. counts[b] + H - 1``) are masked instead, so exactly
    ``counts[b]`` stay masked (``H`` is cut to ``P - counts[b]``). AttMask's code reveals ``show_max * ratio * P``
    tokens drawn uniformly from the top ``show_max * P`` (``show_max = 0.1``), without masking others: with
    ``hints = show_max`` the revealed patches are drawn the same way, and the count is kept.
    ``hints`` in [0, 1).
    """
    if relevance.dim() not in (2, 3):
        raise ValueError(f"relevance_patch_mask expects relevance of shape (B, P) or (B, Gh, Gw), got "
                         f"{tuple(relevance.shape)}")
    r = relevance.flatten(1).float()
    if not 0.0 <= hints < 1.0:
        raise ValueError(f"relevance_patch_mask hints must be in [0, 1), got {hints}")
    b, p = r.shape
    counts = _check_counts(counts, b).to(r.device)
    noise = torch.rand(2, b, p, generator=generator, device=r.device)
    score = r + noise[0] * 1e-6 * r.abs().amax(1, keepdim=True).clamp_min(1e-12)
    rank = _ranks(score)  # 0 = most relevant
    if hints == 0.0:
        return rank < counts.unsqueeze(1)
    n_hint = torch.minimum(torch.round(hints * counts.float()).long(), p - counts)  # (B,) H revealed, H more masked
    pool = torch.minimum(torch.full_like(counts, round(hints * p)), counts)  # the hints come from the top `pool`
    in_pool = rank < pool.unsqueeze(1)
    revealed = masks_from_scores(torch.where(in_pool, noise[1], -1.0), n_hint)  # H uniform picks in the pool
    return (rank < (counts + n_hint).unsqueeze(1)) & ~revealed


def _ranks(scores: Tensor) -> Tensor:
    """``(B, P)`` long: each entry's rank in its row by descending score (0 = highest; ties: lower index first)."""
    b, p = scores.shape
    order = scores.argsort(dim=1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(p, device=scores.device).expand(b, p))


def _check_counts(counts: Tensor, batch: int | None = None) -> Tensor:
    if (not isinstance(counts, Tensor) or counts.dim() != 1 or counts.dtype == torch.bool
            or counts.dtype.is_floating_point or counts.dtype.is_complex):
        raise ValueError(f"counts must be an integer tensor of shape (B,), got "
                         f"{getattr(counts, 'dtype', type(counts).__name__)} {tuple(getattr(counts, 'shape', ()))}")
    if batch is not None and counts.shape[0] != batch:
        raise ValueError(f"counts must have shape (B,) = ({batch},), got {tuple(counts.shape)}")
    return counts.long()


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid):
        raise ValueError(f"grid must be (Gh, Gw), two positive ints, got {grid}")
    return int(grid[0]), int(grid[1])
