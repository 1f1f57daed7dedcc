"""Mode ``background``: penalise the attention mass on keypoint-free patches (suppress only).

``L = mean_b sum_{p : r_bp <= threshold / P} a_bp``, with ``a`` the chosen attention over patches (class token or
mean received, heads averaged, renormalised) of the chosen blocks, averaged over blocks. Nothing pulls the
attention toward any particular keypoint-rich patch: it only pushes it off patches without keypoints.
With a relevance that has no empty patch (uniform, or smoothed) the term is 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import AttentionLoss
from .schedule import GuidanceSchedule

__all__ = ["BackgroundSuppression"]


class BackgroundSuppression(AttentionLoss):
    """Args: model; layers; heads; weight; attention (``cls`` / ``mean`` / ``auto``); threshold (a patch is
    keypoint-free when its relevance is at most ``threshold / P``; 0 means exactly no mass); schedule."""

    name = "background"

    def __init__(self, model: nn.Module, layers: int | Sequence[int] = -1, heads: Sequence[int] | None = None,
                 weight: float = 1.0, attention: str = "auto", threshold: float = 0.0,
                 schedule: GuidanceSchedule | dict | None = None) -> None:
        super().__init__(model, layers, heads, weight, schedule)
        if attention == "auto":
            attention = "cls" if self.cls_index >= 0 else "mean"
        if attention not in ("cls", "mean"):
            raise ValueError(f"unknown attention {attention!r}; expected 'cls', 'mean' or 'auto'")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"background threshold must be in [0, 1), got {threshold}")
        self.attention, self.threshold = attention, float(threshold)

    def value(self, relevance: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        rel = relevance.flatten(1).float()
        if ids_keep is not None:
            rel = rel.gather(1, ids_keep)  # no renormalisation needed: only "is it empty" matters
        free = (rel <= self.threshold / relevance.flatten(1).shape[1]).float()
        values = []
        for layer, a in self.patch_attention(self.attention).items():
            self._check(a, rel, layer, self.num_prefix, relevance)
            values.append((a * free.to(a.device)).sum(-1).mean())
        return torch.stack(values).mean()
