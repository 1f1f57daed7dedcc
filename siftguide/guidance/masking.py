"""Mode ``masking`` (MAE): keypoint-guided masking with hints and an optional random-to-guided curriculum.

Masked patches are drawn without replacement with probability proportional to ``(P r_p + eps) ** alpha``
(Gumbel top-k: ``key_p = alpha * log(P r_p + eps) + Gumbel noise``, the ``M = P - keep`` largest keys are
masked), so relevant patches are hidden more often (AttMask's "mask the salient", Kakogeorgiou et al. 2022).
``alpha = 0`` is plain random masking. Hints: a share ``hint`` of the masked patches, chosen at random, is
revealed and as many random visible patches are masked instead (the count stays ``M``), so that the task stays
solvable. Curriculum (SemMAE-style): ``alpha`` grows linearly from 0 to its value over ``curriculum_steps``.

Control: ``relevance.kind=random`` (noise ranks the patches: random masking with the same code path).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import GuidanceMode

__all__ = ["KeypointMasking", "guided_masking"]


def guided_masking(relevance: Tensor, n_keep: int, alpha: float = 1.0, hint: float = 0.0, eps: float = 0.1,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``ids_keep (B, n_keep)`` (sorted) and ``mask (B, P)`` (1 = masked) from relevance ``(B, P)`` or
    ``(B, Gh, Gw)`` (see the module docstring)."""
    r = relevance.flatten(1).float()
    b, p = r.shape
    if not 0 < n_keep <= p:
        raise ValueError(f"n_keep must be in 1..{p}, got {n_keep}")
    if not 0.0 <= hint <= 1.0:
        raise ValueError(f"hint must be in [0, 1], got {hint}")
    keep = n_keep
    m = p - keep
    u = torch.rand(b, p, device=r.device, generator=generator).clamp_(1e-12, 1 - 1e-7)
    key = alpha * torch.log(p * r + eps) - torch.log(-torch.log(u))  # + Gumbel(0, 1)
    order = key.argsort(dim=1, descending=True)
    masked, visible = order[:, :m], order[:, m:]
    h = min(int(round(hint * m)), keep)
    if h > 0:
        pick = torch.rand(b, m, device=r.device, generator=generator).topk(h, dim=1).indices  # hints to reveal
        swap = torch.rand(b, keep, device=r.device, generator=generator).topk(h, dim=1).indices  # masked instead
        revealed, hidden = masked.gather(1, pick), visible.gather(1, swap)
        masked = masked.scatter(1, pick, hidden)
        visible = visible.scatter(1, swap, revealed)
    ids_keep = visible.sort(dim=1).values
    mask = torch.ones(b, p, device=r.device)
    mask.scatter_(1, ids_keep, 0.0)
    return ids_keep, mask


class KeypointMasking(GuidanceMode):
    """Args: model (unused, for a uniform constructor); alpha (bias strength); hint (share of the masked
    patches revealed at random); eps; curriculum_steps (0: guided from the first step).

    Draws from torch's global generator, as the objective's own random masks do (:mod:`siftguide.rng`)."""

    acts_in = "objective"
    name = "masking"
    selects_tokens = True  # the visible tokens of a masked objective, as many as the objective runs
    requires = "masked_tokens"
    objective_hint = "it needs a masked objective (objective=mae)"

    def __init__(self, model: nn.Module | None = None, alpha: float = 1.0, hint: float = 0.1, eps: float = 0.1,
                 curriculum_steps: int = 0) -> None:
        if alpha < 0:
            raise ValueError(f"masking alpha must be >= 0, got {alpha}")
        if not 0.0 <= hint <= 1.0:
            raise ValueError(f"masking hint must be in [0, 1], got {hint}")
        if eps <= 0 or curriculum_steps < 0:
            raise ValueError(f"masking needs eps > 0 and curriculum_steps >= 0, got {eps} and {curriculum_steps}")
        self.alpha, self.hint, self.eps, self.curriculum_steps = float(alpha), float(hint), float(eps), curriculum_steps

    def current_alpha(self, step: int) -> float:
        if self.curriculum_steps <= 0:
            return self.alpha
        return self.alpha * min(1.0, step / self.curriculum_steps)

    def select_tokens(self, relevance: Tensor, step: int, count: int | None = None) -> Tensor:
        """The visible tokens ``ids_keep (B, count)`` of a masked objective for training step ``step``."""
        if count is None:
            raise ValueError("masking selects the visible tokens of a masked objective, which says how many "
                             "(count); got None")
        return guided_masking(relevance, count, self.current_alpha(step), self.hint, self.eps)[0]

    def __repr__(self) -> str:
        return (f"KeypointMasking(alpha={self.alpha}, hint={self.hint}, eps={self.eps}, "
                f"curriculum_steps={self.curriculum_steps})")
