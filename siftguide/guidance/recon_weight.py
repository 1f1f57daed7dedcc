"""Mode ``recon_weight`` (MAE): keypoint-weighted reconstruction loss (KAMIM, arXiv 2407.13873).

Per patch, a density ``rho_p`` in [0, 1] from the relevance ``r`` (``density='max'``: ``r_p / max_q r_q``, the
image's densest patch is 1), then ``w_p = exp(rho_p / T) / min_q exp(rho_q / T)``: the least dense patch weighs 1
(plain MAE), the densest ``exp(1 / T)`` (T = 0.25: about 55). The objective weights its masked-patch loss with them
(:func:`siftguide.objectives.base.weighted_patch_loss`):

* ``normalize='mask'`` (KAMIM / SimMIM): ``sum_p w_p m_p l_p / sum_p m_p``;
* ``normalize='weight'``: ``sum_p w_p m_p l_p / sum_p w_p m_p`` (a weighted mean: same scale as plain MAE).

A uniform relevance (and an image without keypoints, which gets the uniform map) gives ``w = 1``: plain MAE.
No attention loss is involved.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import GuidanceMode

__all__ = ["KeypointReconWeight", "keypoint_weights", "WEIGHT_NORMS"]

WEIGHT_NORMS = ("mask", "weight")


def keypoint_weights(relevance: Tensor, temperature: float = 0.25) -> Tensor:
    """KAMIM patch weights ``(B, P)`` >= 1 from relevance ``(B, Gh, Gw)`` or ``(B, P)``."""
    if temperature <= 0:
        raise ValueError(f"recon_weight temperature must be > 0, got {temperature}")
    r = relevance.flatten(1).float()
    rho = r / r.amax(1, keepdim=True).clamp_min(1e-12)
    # exp(rho / T) / min exp(rho / T) = exp((rho - min rho) / T): no overflow for small T
    return torch.exp((rho - rho.amin(1, keepdim=True)) / temperature)


class KeypointReconWeight(GuidanceMode):
    """Args: model (unused); temperature ``T``; normalize (``mask`` or ``weight``: how the objective normalises the
    weighted loss, see the module docstring)."""

    acts_in = "objective"
    name = "recon_weight"
    weights_patches = True
    requires = "patch_weights"
    objective_hint = "it weights a reconstruction loss (objective=mae)"

    def __init__(self, model: nn.Module | None = None, temperature: float = 0.25, normalize: str = "mask") -> None:
        if temperature <= 0:
            raise ValueError(f"recon_weight temperature must be > 0, got {temperature}")
        if normalize not in WEIGHT_NORMS:
            raise ValueError(f"recon_weight normalize must be one of {WEIGHT_NORMS}, got {normalize!r}")
        self.temperature, self.normalize = float(temperature), normalize

    def patch_weights(self, relevance: Tensor, step: int) -> tuple[Tensor, str]:
        """KAMIM weights ``(B, P)`` >= 1 of this step's relevance, and how to normalise the weighted loss."""
        return keypoint_weights(relevance, self.temperature), self.normalize

    def __repr__(self) -> str:
        return f"KeypointReconWeight(temperature={self.temperature}, normalize={self.normalize!r})"
