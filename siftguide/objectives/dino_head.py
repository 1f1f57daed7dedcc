"""DINO projection head (Caron et al. 2021): a 3-layer MLP, L2 normalisation, a weight-normalised linear layer.

``x -> Linear-[BN]-GELU -> Linear-[BN]-GELU -> Linear (bottleneck) -> x / ||x|| -> W x`` with ``W = g * V / ||V||``
row-wise (``torch.nn.utils.parametrizations.weight_norm``, no bias), ``g = 1`` and frozen when ``norm_last_layer``:
the outputs are then cosine similarities to ``output_dim`` learned prototypes, in [-1, 1]. Layout as lightly's
``DINOProjectionHead``: the MLP's linear layers have a bias unless followed by BatchNorm; they are initialised
truncated-normal (std 0.02, bounds +-2), the last layer keeps PyTorch's default init before normalisation.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOProjectionHead"]


class DINOProjectionHead(nn.Module):
    """Args: input_dim (backbone width); hidden_dim; bottleneck_dim; output_dim (number of prototypes K);
    batch_norm (BatchNorm1d after the two hidden linears; False for ViTs); norm_last_layer (``g`` fixed to 1).

    ``forward``: ``(B, input_dim)`` or ``(B, P, input_dim)`` -> ``(B, output_dim)`` or ``(B, P, output_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, output_dim: int = 65536,
                 batch_norm: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        for name, dim in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("bottleneck_dim", bottleneck_dim),
                          ("output_dim", output_dim)):
            if dim < 1:
                raise ValueError(f"DINOProjectionHead {name} must be >= 1, got {dim}")
        self.input_dim, self.output_dim = input_dim, output_dim
        layers: list[nn.Module] = []
        for d_in in (input_dim, hidden_dim):
            layers.append(nn.Linear(d_in, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.layers = nn.Sequential(*layers)
        self.layers.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, output_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # (output_dim, 1): the row norms of W
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_dim:
            raise ValueError(f"DINOProjectionHead expects x of shape (B, {self.input_dim}) or (B, P, "
                             f"{self.input_dim}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        z = self.layers(x.reshape(-1, self.input_dim))  # BatchNorm1d needs (N, C)
        z = nn.functional.normalize(z, dim=-1, p=2)
        return self.last_layer(z).reshape(*lead, self.output_dim)

    def cancel_last_layer_gradients(self, step: int, freeze_steps: int) -> None:
        """Drop the last layer's gradients (``grad = None``: the optimizer skips it) while ``step < freeze_steps``
        (DINO's ``freeze_last_layer``, counted in optimizer steps); call it between ``backward`` and ``step``."""
        if step >= freeze_steps:
            return
        for p in self.last_layer.parameters():
            p.grad = None


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
