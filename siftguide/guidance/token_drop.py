"""Mode ``token_drop``: keep the most relevant patch tokens of each image before the blocks (cheaper steps).

Per image, ``K = n_keep = round(keep_ratio * P)`` patch tokens go through the blocks (prefix tokens always do):
``K - R`` of highest relevance plus ``R = round(random_share * K)`` drawn at random from the rest
(ties in relevance are broken at random). Evaluation always sees all tokens, and so does training from step
``full_after * total_steps`` on when ``full_after`` is set (a short full-sequence phase before the end).

Control: ``relevance.kind=random`` ranks patches by fresh noise, i.e. random dropping at the same keep ratio
(PatchDropout, Liu et al. 2022).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..rng import RandomStream
from .base import GuidanceMode

__all__ = ["TokenDrop", "select_tokens"]


def select_tokens(relevance: Tensor, n_keep: int, n_random: int = 0,
                  generator: torch.Generator | None = None) -> Tensor:
    """``ids_keep (B, n_keep)`` (sorted): the ``n_keep - n_random`` most relevant patches of each image plus
    ``n_random`` random others, from relevance ``(B, Gh, Gw)`` or ``(B, P)``."""
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
    return top.sort(dim=1).values


class TokenDrop(GuidanceMode):
    """Args: model; keep_ratio (share of patch tokens kept, in (0, 1]); random_share (share of the kept tokens
    drawn at random); full_after (fraction of total_steps after which training keeps all tokens; null: never);
    total_steps; seed (of the tie-breaking / random draws, on the batch's device: :class:`~siftguide.rng.RandomStream`
    ``rng``). ``n_keep``: the number of patch tokens kept, ``round(keep_ratio * P)``."""

    acts_in = "forward"
    name = "token_drop"
    selects_tokens = True
    requires = "token_subset"  # an objective that runs any given subset of patch tokens
    objective_hint = "use it with objective=supervised, or masking with MAE"

    def __init__(self, model: nn.Module, keep_ratio: float = 0.5, random_share: float = 0.0,
                 full_after: float | None = None, total_steps: int = 0, seed: int = 0) -> None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"token_drop keep_ratio must be in (0, 1], got {keep_ratio}")
        if not 0.0 <= random_share <= 1.0:
            raise ValueError(f"token_drop random_share must be in [0, 1], got {random_share}")
        if full_after is not None and (not 0.0 <= full_after <= 1.0 or total_steps <= 0):
            raise ValueError(f"token_drop full_after must be in [0, 1] with total_steps > 0, got {full_after} "
                             f"and {total_steps}")
        if not hasattr(model, "patch_embed"):
            raise TypeError("token_drop needs a timm VisionTransformer (patch_embed, _pos_embed, blocks)")
        self.num_patches = int(model.patch_embed.num_patches)
        self.n_keep = max(1, int(round(keep_ratio * self.num_patches)))
        self.n_random = int(round(random_share * self.n_keep))
        self.keep_ratio, self.random_share = keep_ratio, random_share
        self.full_after, self.total_steps = full_after, total_steps
        self.rng = RandomStream(seed)

    @property
    def active(self) -> bool:
        return self.n_keep < self.num_patches

    def dropping(self, step: int) -> bool:
        return self.active and (self.full_after is None or step < self.full_after * self.total_steps)

    def needs_relevance(self, stage: str) -> bool:
        return stage == "train" and self.active

    def select_tokens(self, relevance: Tensor, step: int, count: int | None = None) -> Tensor | None:
        """``ids_keep (B, n_keep)`` for training step ``step``, or None when all tokens are used."""
        if not self.dropping(step):
            return None
        return select_tokens(relevance, self.n_keep, self.n_random, self.rng.generator(relevance.device))

    def __repr__(self) -> str:
        return (f"TokenDrop(keep_ratio={self.keep_ratio} ({self.n_keep}/{self.num_patches}), "
                f"random_share={self.random_share}, full_after={self.full_after})")
