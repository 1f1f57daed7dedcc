"""Mode ``token_drop``: keep the most relevant patch tokens of each image before the blocks (cheaper steps).

Per image, ``K = round(keep * P)`` patch tokens go through the blocks (prefix tokens always do):
``K - R`` of highest relevance plus ``R = round(random_share * K)`` drawn at random from the rest
(ties in relevance are broken at random). Evaluation always sees all tokens, and so does training from step
``full_after * total_steps`` on when ``full_after`` is set (a short full-sequence phase before the end).

Control: ``relevance.kind=random`` ranks patches by fresh noise, i.e. random dropping at the same keep ratio
(PatchDropout, Liu et al. 2022).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import GuidanceMode

__all__ = ["TokenDrop", "select_tokens"]


def select_tokens(relevance: Tensor, keep: int, random_count: int = 0,
                  generator: torch.Generator | None = None) -> Tensor:
    """``ids_keep (B, keep)`` (sorted): the ``keep - random_count`` most relevant patches of each image plus
    ``random_count`` random others, from relevance ``(B, Gh, Gw)`` or ``(B, P)``."""
    r = relevance.flatten(1).float()
    b, p = r.shape
    if not 0 < keep <= p:
        raise ValueError(f"keep must be in 1..{p} patches, got {keep}")
    if not 0 <= random_count <= keep:
        raise ValueError(f"random_count must be in 0..{keep}, got {random_count}")
    noise = torch.rand(b, p, device=r.device, generator=generator)
    # ranks by relevance, ties broken by noise: the noise is far below any relevance gap of a distribution
    score = r + noise * 1e-6 * r.amax(1, keepdim=True).clamp_min(1e-12)
    top = score.topk(keep - random_count, dim=1).indices
    if random_count:
        noise = noise.scatter(1, top, -1.0)  # already kept: never drawn again
        top = torch.cat([top, noise.topk(random_count, dim=1).indices], dim=1)
    return top.sort(dim=1).values


class TokenDrop(GuidanceMode):
    """Args: model; keep (share of patch tokens kept, in (0, 1]); random_share (share of the kept tokens drawn
    at random); full_after (fraction of total_steps after which training keeps all tokens; null: never);
    total_steps; seed (of the tie-breaking / random draws, on the batch's device)."""

    acts_in = "forward"
    name = "token_drop"
    selects_tokens = True  # bind() then requires an objective that runs given tokens (supports_token_drop)
    objective_hint = "use it with objective=supervised, or masking with MAE"

    def __init__(self, model: nn.Module, keep: float = 0.5, random_share: float = 0.0,
                 full_after: float | None = None, total_steps: int = 0, seed: int = 0) -> None:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"token_drop keep must be in (0, 1], got {keep}")
        if not 0.0 <= random_share <= 1.0:
            raise ValueError(f"token_drop random_share must be in [0, 1], got {random_share}")
        if full_after is not None and (not 0.0 <= full_after <= 1.0 or total_steps <= 0):
            raise ValueError(f"token_drop full_after must be in [0, 1] with total_steps > 0, got {full_after} "
                             f"and {total_steps}")
        if not hasattr(model, "patch_embed"):
            raise TypeError("token_drop needs a timm VisionTransformer (patch_embed, _pos_embed, blocks)")
        self.num_patches = int(model.patch_embed.num_patches)
        self.keep_count = max(1, int(round(keep * self.num_patches)))
        self.random_count = int(round(random_share * self.keep_count))
        self.keep, self.random_share, self.full_after, self.total_steps = keep, random_share, full_after, total_steps
        self.seed, self._gen = seed, None
        self.step = 0

    @property
    def active(self) -> bool:
        return self.keep_count < self.num_patches

    def reseed(self, seed: int) -> None:
        """Restart the random share's draws from ``seed`` (distinct per data-parallel rank)."""
        self.seed, self._gen = seed, None

    def dropping(self, step: int) -> bool:
        return self.active and (self.full_after is None or step < self.full_after * self.total_steps)

    def needs_relevance(self, stage: str) -> bool:
        return stage == "train" and self.active

    def select(self, relevance: Tensor, step: int | None = None) -> Tensor | None:
        """``ids_keep (B, K)`` for a training step, or None when all tokens are used."""
        if not self.dropping(self.step if step is None else step):
            return None
        if self._gen is None or self._gen.device != relevance.device:
            self._gen = torch.Generator(device=relevance.device).manual_seed(self.seed)
        return select_tokens(relevance, self.keep_count, self.random_count, self._gen)

    def select_tokens(self, relevance: Tensor, step: int) -> Tensor | None:  # the hook (see GuidanceMode)
        return self.select(relevance, step)

    def __repr__(self) -> str:
        return (f"TokenDrop(keep={self.keep} ({self.keep_count}/{self.num_patches}), random_share={self.random_share},"
                f" full_after={self.full_after})")
