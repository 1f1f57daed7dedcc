"""``AttentionAlignment`` (mode ``attention``): pull chosen blocks' attention toward a patch relevance distribution.

Usable in any training loop::

    guide = AttentionAlignment(model, layers=[-1], weight=0.3)
    rel = patch_relevance(images, patch_size=16)       # (B, Gh, Gw), or any target distribution
    with guide.capture():
        logits = model(normalize(images))
    loss = task_loss + guide.loss(rel, step)            # weight * schedule(step) * divergence

The loss for one guided layer is ``D(r || a)`` averaged over the batch, where ``r`` is the relevance over the
``P`` patches and ``a`` the chosen attention over the patches (class-token attention or mean attention received,
prefix tokens removed, renormalised); several layers are averaged. ``head_reduce='mean'`` aligns the
head-averaged attention, ``'each'`` every chosen head on its own (each head's divergence, averaged). Divergences:

* ``kl``: ``sum_p r_p (log r_p - log a_p)`` (0 when ``a == r``);
* ``ce``: ``-sum_p r_p log a_p`` (KL plus the entropy of ``r``; same gradients, offset value);
* ``mse``: ``P * sum_p (a_p - r_p)^2`` (scale-free in ``P``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..precision import fp32_region
from .base import AttentionLoss, visible_relevance
from .schedule import GuidanceSchedule

__all__ = ["AttentionAlignment", "divergence", "kl_divergence", "DIVERGENCES", "visible_relevance"]

DIVERGENCES = ("kl", "ce", "mse")


def kl_divergence(p: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """``KL(p || q) = sum p (log p - log(q + eps))`` over the last axis: ``(..., P)`` -> ``(...)``, ``p`` and ``q``
    broadcast; ``0 log 0 = 0``, and ``eps`` keeps ``log q`` finite where ``q = 0``. ``torch.nn.functional.kl_div``
    computes it; the package's one KL: the ``kl`` guidance loss (:func:`divergence`) and the analysis' agreement of
    attention with relevance use it."""
    p, q = torch.broadcast_tensors(p, q)
    return F.kl_div(torch.log(q + eps), p, reduction="none").sum(-1)


def divergence(att: Tensor, rel: Tensor, kind: str = "kl", eps: float = 1e-8) -> Tensor:
    """Per-sample divergence ``(B, ...)`` between attention ``att`` and relevance ``rel``, both ``(..., P)``
    distributions over the last axis (see the module docstring for the formulas)."""
    if att.shape != rel.shape:
        raise ValueError(f"attention {tuple(att.shape)} and relevance {tuple(rel.shape)} must both be (B, P)")
    if kind == "kl":
        return kl_divergence(rel, att, eps)
    if kind == "ce":
        return -(rel * torch.log(att + eps)).sum(-1)
    if kind == "mse":
        return (att - rel).pow(2).sum(-1) * att.shape[-1]
    raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")


class AttentionAlignment(AttentionLoss):
    """Guide the attention of chosen blocks of a timm ViT toward a patch relevance distribution.

    Args:
        model: a timm ``VisionTransformer`` (or DeiT / EVA / any model with ``.blocks[i].attn`` of a supported
            class). Class, distillation and register tokens are found from the model.
        layers: block indices to guide (early ones included); negative counts from the end.
        heads: heads to use (default all).
        weight: loss multiplier. ``weight == 0`` makes the plugin inert: no capture, the model keeps fused
            attention everywhere, and training is bit-identical to the baseline.
        attention: ``cls`` (class token -> patches), ``mean`` (attention received by each patch) or ``auto``
            (``cls`` when the model has a class token).
        divergence: ``kl``, ``ce`` or ``mse``.
        head_reduce: ``mean`` (align the heads' average) or ``each`` (align every chosen head).
        schedule: a :class:`GuidanceSchedule` (or its kwargs as a dict); default constant.
    """

    name = "attention"

    def __init__(
        self, model: nn.Module, layers: int | Sequence[int] = -1, heads: Sequence[int] | None = None,
        weight: float = 1.0, attention: str = "auto", divergence: str = "kl",
        schedule: GuidanceSchedule | dict | None = None, eps: float = 1e-8, head_reduce: str = "mean",
    ) -> None:
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
        if head_reduce not in ("mean", "each"):
            raise ValueError(f"head_reduce must be 'mean' or 'each', got {head_reduce!r}")
        super().__init__(model, layers, heads, weight, schedule)
        if attention == "auto":
            attention = "cls" if self.cls_index >= 0 else "mean"
        if attention not in ("cls", "mean"):
            raise ValueError(f"unknown attention {attention!r}; expected 'cls', 'mean' or 'auto'")
        if attention == "cls" and self.cls_index < 0:
            raise ValueError(f"{type(model).__name__} has no class token: use attention='mean' (or 'auto')")
        self.attention, self.divergence, self.eps, self.head_reduce = attention, divergence, eps, head_reduce

    def patch_attention(self, kind: str | None = None, reduce_heads: bool = True) -> dict[int, Tensor]:
        return super().patch_attention(kind or self.attention, reduce_heads)

    @fp32_region()
    def divergence_value(self, relevance: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Unweighted divergence averaged over batch and guided layers (a scalar tensor).

        relevance: ``(B, Gh, Gw)`` or ``(B, P)`` distributions. ``ids_keep (B, V)``: for masked models (MAE) or
        dropped tokens, the indices of the patches the encoder saw; the relevance is restricted to them.
        """
        rel = relevance.flatten(1).float()
        if ids_keep is not None:
            rel = visible_relevance(rel, ids_keep)
        values = []
        for layer, att in self.patch_attention(reduce_heads=self.head_reduce == "mean").items():
            self._check(att, rel, layer, self.num_prefix, relevance)
            r = rel.to(att.device)
            if att.ndim == 3:  # (B, h, P): every head against the same target
                r = r.unsqueeze(1).expand_as(att)
            values.append(divergence(att, r, self.divergence, self.eps).mean())
        return torch.stack(values).mean()

    value = divergence_value

    def __repr__(self) -> str:
        return (f"AttentionAlignment(layers={self.layers}, heads={self.heads}, weight={self.weight}, "
                f"attention={self.attention!r}, divergence={self.divergence!r}, head_reduce={self.head_reduce!r}, "
                f"schedule={self.schedule})")

