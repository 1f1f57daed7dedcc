"""Mode ``interrelation``: the weighted patch interrelation as a target for patch-to-patch attention.

For patch queries ``i`` and keys ``j`` of the chosen (typically early) blocks, the target row is

    T_ij = r_j K_ij / sum_j' r_j' K_ij',    K_ij = exp(-|g_i - g_j|^2 / (2 sigma^2))

with ``r`` the relevance over patches, ``g`` the patch positions on the grid (in patches) and ``sigma`` the
locality width in patches: each patch should attend to the semantically rich patches near it. Rows whose
neighbourhood holds no relevance fall back to the kernel alone. The attention ``A_ij`` is the block's
patch-to-patch attention (prefix keys removed, rows renormalised, chosen heads averaged). The term is
``mean_{b,i} KL(T_bi || A_bi)``, averaged over the chosen blocks.

Controls: ``relevance.kind=shuffled`` (or ``rolled``) keeps the kernel and moves the relevance, so the SIFT part is
separated from a plain locality prior; ``relevance.kind=uniform`` is the locality prior alone.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..relevance import patch_positions
from .attention import divergence
from .base import AttentionLoss
from .schedule import GuidanceSchedule

__all__ = ["PatchInterrelation", "interrelation_target"]


def interrelation_target(rel: Tensor, grid: tuple[int, int], sigma: float,
                         ids_keep: Tensor | None = None) -> Tensor:
    """Target ``(B, V, V)`` rows summing to 1 from relevance ``(B, Gh, Gw)`` (see module docstring); with
    ``ids_keep (B, V)`` only the kept patches take part (queries and keys)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 (in patches), got {sigma}")
    r = rel.flatten(1).float()
    pos = patch_positions(grid, rel.device)  # (P, 2)
    if ids_keep is not None:  # per image: the kept patches' positions (B, V, 2)
        r = r.gather(1, ids_keep)
        pos = pos[ids_keep]
    kernel = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * sigma**2))  # (P, P), or (B, V, V) with ids_keep
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(0)  # one kernel for the whole batch
    t = kernel * r.unsqueeze(1)
    s = t.sum(-1, keepdim=True)
    k = kernel / kernel.sum(-1, keepdim=True)
    return torch.where(s > 1e-12, t / s.clamp_min(1e-12), k)


class PatchInterrelation(AttentionLoss):
    """Guide patch-to-patch attention of chosen blocks toward :func:`interrelation_target`.

    Args: model; layers (default the first two blocks); heads; weight; sigma (kernel width in patches);
    schedule; eps (inside the log).
    """

    name = "interrelation"

    def __init__(self, model: nn.Module, layers: int | Sequence[int] = (0, 1), heads: Sequence[int] | None = None,
                 weight: float = 1.0, sigma: float = 1.5, schedule: GuidanceSchedule | dict | None = None,
                 eps: float = 1e-8) -> None:
        super().__init__(model, layers, heads, weight, schedule)
        if sigma <= 0:
            raise ValueError(f"interrelation sigma must be > 0 (in patches), got {sigma}")
        self.sigma, self.eps = float(sigma), eps
        self.grid = tuple(model.patch_embed.grid_size)

    def value(self, relevance: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        if relevance.ndim != 3:
            raise ValueError(f"interrelation needs relevance on the grid (B, Gh, Gw), got {tuple(relevance.shape)}")
        target = interrelation_target(relevance, self.grid, self.sigma, ids_keep)  # (B, V, V)
        values = []
        for layer, m in self.maps().items():
            a = m[:, :, self.num_prefix:, self.num_prefix:].mean(1)  # (B, V, V) patch -> patch, heads averaged
            a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
            self._check(a, target, layer, self.num_prefix, relevance)
            values.append(divergence(a, target.to(a.device), "kl", self.eps).mean())  # KL per query row
        return torch.stack(values).mean()

    def __repr__(self) -> str:
        return f"PatchInterrelation(layers={self.layers}, heads={self.heads}, weight={self.weight}, sigma={self.sigma})"
