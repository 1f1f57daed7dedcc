"""Mode ``token_drop``: keep the most relevant patch tokens of each image before the blocks (cheaper steps).

Per image, ``K = n_keep = round(keep_ratio * P)`` patch tokens go through the blocks (prefix tokens always do):
``K - R`` of highest relevance plus ``R = round(random_share * K)`` drawn at random from the rest
(ties in relevance are broken at random). Evaluation always sees all tokens, and so does training from step
``full_after * total_steps`` on when ``full_after`` is set (a short full-sequence phase before the end).

Per-image budget (``budget: entropy`` or ``spread``; ``fixed`` is the default above): each image keeps ``k_i``
tokens, more where its map is spread out (``entropy``: the map's effective number of patches ``exp(H)``; ``spread``:
the relevance-weighted spatial spread of its patches), within ``budget_range`` times ``K`` and with the batch's mean
keep exactly ``K`` (:func:`allocate_budget`). Shapes stay static: every image runs ``K_max = budget_range[1] * K``
tokens in rank order (most relevant first), and the ``K_max - k_i`` lowest-ranked of them are padding that the
objective masks out of attention (:meth:`TokenDrop.keep_counts`, :func:`~siftguide.objectives.base.encode`).

Control: ``relevance.kind=random`` ranks patches by fresh noise, i.e. random dropping at the same keep ratio
(PatchDropout, Liu et al. 2022).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..rng import RandomStream
from .base import GuidanceMode

__all__ = ["TokenDrop", "select_tokens", "allocate_budget", "budget_weights"]

BUDGETS = ("fixed", "entropy", "spread")


def select_tokens(relevance: Tensor, n_keep: int, n_random: int = 0,
                  generator: torch.Generator | None = None, ranked: bool = False) -> Tensor:
    """``ids_keep (B, n_keep)`` (sorted; in rank order, most relevant first, with ``ranked``): the
    ``n_keep - n_random`` most relevant patches of each image plus ``n_random`` random others, from relevance
    ``(B, Gh, Gw)`` or ``(B, P)``."""
    r = relevance.flatten(1).float()
    b, p = r.shape
    if not 0 < n_keep <= p:
        raise ValueError(f"n_keep must be in 1..{p} patches, got {n_keep}")
    if not 0 <= n_random <= n_keep:
        raise ValueError(f"n_random must be in 0..{n_keep}, got {n_random}")
    noise = torch.rand(b, p, device=r.device, generator=generator)
    # ranks by relevance, ties broken by noise: the noise is far below any relevance gap of a distribution
    score = r + noise * 1e-6 * r.amax(1, keepdim=True).clamp_min(1e-12)
    top = score.topk(n_keep - n_random, dim=1).indices
    if n_random:
        noise = noise.scatter(1, top, -1.0)  # already kept: never drawn again
        top = torch.cat([top, noise.topk(n_random, dim=1).indices], dim=1)
    return top if ranked else top.sort(dim=1).values


def budget_weights(relevance: Tensor, kind: str) -> Tensor:
    """``(B,)`` positive weights of the per-image budget from relevance ``(B, Gh, Gw)``: ``entropy``: ``exp(H)`` of
    the normalised map (its effective number of patches, ``P`` for a uniform map); ``spread``: the root of the
    relevance-weighted variance of the patch coordinates, in patches (0 for a map on one patch)."""
    if relevance.ndim != 3:
        raise ValueError(f"a per-image budget needs relevance (B, Gh, Gw), got {tuple(relevance.shape)}")
    b, gh, gw = relevance.shape
    r = relevance.float().clamp_min(0).flatten(1)
    r = r / r.sum(1, keepdim=True).clamp_min(1e-12)
    if kind == "entropy":
        return torch.exp(-(r * r.clamp_min(1e-12).log()).sum(1))
    if kind == "spread":
        ys = torch.arange(gh, device=r.device, dtype=r.dtype).repeat_interleave(gw)
        xs = torch.arange(gw, device=r.device, dtype=r.dtype).repeat(gh)
        var = sum((r * c ** 2).sum(1) - (r * c).sum(1) ** 2 for c in (ys, xs))
        return var.clamp_min(0).sqrt()
    raise ValueError(f"budget must be one of {BUDGETS}, got {kind!r}")


def allocate_budget(weights: Tensor, n_mean: int, n_min: int, n_max: int) -> Tensor:
    """Integer keep counts ``(B,)`` in ``[n_min, n_max]`` summing to exactly ``B * n_mean``, growing with
    ``weights (B,)``: the water-filling ``min(n_max, n_min + t * w_i)`` with the one ``t`` that spends the budget,
    rounded by largest remainders. Tensor ops only (no host synchronisation); equal weights give ``n_mean`` each."""
    if not 1 <= n_min <= n_mean <= n_max:
        raise ValueError(f"need 1 <= n_min <= n_mean <= n_max, got {n_min}, {n_mean}, {n_max}")
    w = weights.float().clamp_min(0)
    b = w.shape[0]
    # all-equal (or all-zero) weights: share evenly
    w = torch.where(w.amax() - w.amin() > 1e-6 * w.amax().clamp_min(1e-12), w, torch.ones_like(w))
    w = w.clamp_min(1e-6 * w.amax())
    spare = float(b * (n_mean - n_min))
    # breakpoints: image i is capped once t >= (n_max - n_min) / w_i; try j = 0..B capped images (smallest first)
    t_cap, order = ((n_max - n_min) / w).sort()
    w_sorted = w[order]
    rest = w_sorted.flip(0).cumsum(0).flip(0)  # rest[j]: the weight of the images not capped when j are
    j = torch.arange(b, device=w.device, dtype=w.dtype)
    t = (spare - j * (n_max - n_min)) / rest
    lower = torch.cat([t_cap.new_zeros(1), t_cap[:-1]])  # t reaches the j capped images' caps, not the next one's
    ok = (t <= t_cap * (1 + 1e-6)) & (t >= lower * (1 - 1e-6))
    t = t[ok.float().argmax()]  # the first consistent j (one always is: n_mean <= n_max)
    alloc = torch.minimum(torch.full_like(w, float(n_max)), n_min + t * w)
    counts = alloc.floor()
    remainder = (b * n_mean - counts.sum()).round()
    frac = torch.where(counts < n_max, alloc - counts, torch.full_like(alloc, -1.0))
    rank = frac.argsort(descending=True).argsort()
    return (counts + (rank < remainder).to(counts.dtype)).long()


class TokenDrop(GuidanceMode):
    """Args: model; keep_ratio (share of patch tokens kept, in (0, 1]); random_share (share of the kept tokens
    drawn at random); full_after (fraction of total_steps after which training keeps all tokens; null: never);
    total_steps; seed (of the tie-breaking / random draws, on the batch's device: :class:`~siftguide.rng.RandomStream`
    ``rng``); budget (``fixed``: ``n_keep`` tokens per image; ``entropy`` / ``spread``: per image, see the module
    docstring); budget_range (``[low, high]``: with a per-image budget each image keeps between ``low * n_keep`` and
    ``high * n_keep`` tokens; the blocks run ``n_run = high * n_keep``). ``n_keep``: the mean number of patch tokens
    kept, ``round(keep_ratio * P)``."""

    acts_in = "forward"
    name = "token_drop"
    selects_tokens = True
    requires = "token_subset"  # an objective that runs any given subset of patch tokens
    objective_hint = "use it with objective=supervised, or masking with MAE"

    def __init__(self, model: nn.Module, keep_ratio: float = 0.5, random_share: float = 0.0,
                 full_after: float | None = None, total_steps: int = 0, seed: int = 0, budget: str = "fixed",
                 budget_range: tuple[float, float] = (0.5, 1.5)) -> None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"token_drop keep_ratio must be in (0, 1], got {keep_ratio}")
        if not 0.0 <= random_share <= 1.0:
            raise ValueError(f"token_drop random_share must be in [0, 1], got {random_share}")
        if full_after is not None and (not 0.0 <= full_after <= 1.0 or total_steps <= 0):
            raise ValueError(f"token_drop full_after must be in [0, 1] with total_steps > 0, got {full_after} "
                             f"and {total_steps}")
        if budget not in BUDGETS:
            raise ValueError(f"token_drop budget must be one of {BUDGETS}, got {budget!r}")
        low, high = (float(v) for v in budget_range)
        if not 0.0 < low <= 1.0 <= high:
            raise ValueError(f"token_drop budget_range must be [low, high] with 0 < low <= 1 <= high (multiples of "
                             f"the mean keep), got {list(budget_range)}")
        if budget != "fixed" and random_share > 0:
            raise ValueError("token_drop random_share > 0 needs budget=fixed (a per-image budget ranks every kept "
                             "token by relevance); set token_drop.random_share=0 or token_drop.budget=fixed")
        if not hasattr(model, "patch_embed"):
            raise TypeError("token_drop needs a timm VisionTransformer (patch_embed, _pos_embed, blocks)")
        self.num_patches = int(model.patch_embed.num_patches)
        self.n_keep = max(1, int(round(keep_ratio * self.num_patches)))
        self.n_random = int(round(random_share * self.n_keep))
        self.keep_ratio, self.random_share = keep_ratio, random_share
        self.full_after, self.total_steps = full_after, total_steps
        self.rng = RandomStream(seed)
        self.budget = budget
        self.budget_range = (low, high)
        self.n_min = max(1, int(math.floor(low * self.n_keep)))
        self.n_run = self.n_keep if budget == "fixed" else min(self.num_patches, int(math.ceil(high * self.n_keep)))

    @property
    def active(self) -> bool:
        return self.n_keep < self.num_patches

    def dropping(self, step: int) -> bool:
        return self.active and (self.full_after is None or step < self.full_after * self.total_steps)

    def needs_relevance(self, stage: str) -> bool:
        return stage == "train" and self.active

    def select_tokens(self, relevance: Tensor, step: int, count: int | None = None) -> Tensor | None:
        """``ids_keep (B, n_run)`` for training step ``step``, or None when all tokens are used: sorted patch indices
        with the fixed budget; in rank order (most relevant first) with a per-image budget, where only the first
        :meth:`keep_counts` of each row are kept and the rest pad the static shape."""
        if not self.dropping(step):
            return None
        generator = self.rng.generator(relevance.device)
        if self.budget == "fixed":
            return select_tokens(relevance, self.n_keep, self.n_random, generator)
        return select_tokens(relevance, self.n_run, 0, generator, ranked=True)

    def keep_counts(self, relevance: Tensor, step: int) -> Tensor | None:
        """``(B,)`` tokens each image keeps among the first of :meth:`select_tokens`' row (per-image budget; the
        batch mean is exactly ``n_keep``), or None: every selected token is kept."""
        if self.budget == "fixed" or not self.dropping(step):
            return None
        return allocate_budget(budget_weights(relevance, self.budget), self.n_keep, self.n_min, self.n_run)

    def __repr__(self) -> str:
        budget = "" if self.budget == "fixed" else f", budget={self.budget} ({self.n_min}..{self.n_run})"
        return (f"TokenDrop(keep_ratio={self.keep_ratio} ({self.n_keep}/{self.num_patches}), "
                f"random_share={self.random_share}, full_after={self.full_after}{budget})")
