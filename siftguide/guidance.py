"""``SiftGuidance``: the plugin that pulls a timm ViT's attention toward SIFT patch relevance.

Usable in any training loop::

    guide = SiftGuidance(model, layers=[-1], weight=0.3)
    rel = patch_relevance(images, patch_size=16)       # (B, Gh, Gw), or any target distribution
    with guide.capture():
        logits = model(normalize(images))
    loss = task_loss + guide.loss(rel)                  # weight * schedule(step) * divergence

The loss for one guided layer is ``D(r || a)`` averaged over the batch, where ``r`` is the relevance over the
``P`` patches and ``a`` the chosen attention over the patches (class-token attention or mean attention received,
heads averaged, prefix tokens removed, renormalised); several layers are averaged. Divergences:

* ``kl``: ``sum_p r_p (log r_p - log a_p)`` (0 when ``a == r``);
* ``ce``: ``-sum_p r_p log a_p`` (KL plus the entropy of ``r``; same gradients, offset value);
* ``mse``: ``P * sum_p (a_p - r_p)^2`` (scale-free in ``P``).

No Lightning import: the Lightning module composes this object.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .attention import AttentionCapture, attention_to_patches, prefix_tokens

__all__ = ["SiftGuidance", "GuidanceSchedule", "divergence", "DIVERGENCES", "visible_relevance"]

DIVERGENCES = ("kl", "ce", "mse")


@dataclass
class GuidanceSchedule:
    """Multiplier of the guidance weight over optimizer steps.

    kind: ``constant``; ``linear`` / ``cosine``: decay from 1 to ``end_factor`` over ``total_steps``;
    every kind first ramps up linearly over ``warmup_steps``. Steps past ``total_steps`` keep ``end_factor``.
    """

    kind: str = "constant"
    total_steps: int = 0
    warmup_steps: int = 0
    end_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown guidance schedule {self.kind!r}; expected constant, linear or cosine")
        if self.kind != "constant" and self.total_steps <= 0:
            raise ValueError(f"schedule {self.kind!r} needs total_steps > 0 (got {self.total_steps})")

    def __call__(self, step: int) -> float:
        f = 1.0
        if self.kind != "constant":
            t = min(max(step, 0) / self.total_steps, 1.0)
            decay = 1 - t if self.kind == "linear" else 0.5 * (1 + math.cos(math.pi * t))
            f = self.end_factor + (1 - self.end_factor) * decay
        if self.warmup_steps > 0 and step < self.warmup_steps:
            f *= (step + 1) / self.warmup_steps
        return f


def divergence(att: Tensor, rel: Tensor, kind: str = "kl", eps: float = 1e-8) -> Tensor:
    """Per-sample divergence ``(B,)`` between attention ``att`` and relevance ``rel``, both ``(B, P)``
    distributions (see the module docstring for the formulas)."""
    if att.shape != rel.shape:
        raise ValueError(f"attention {tuple(att.shape)} and relevance {tuple(rel.shape)} must both be (B, P)")
    if kind == "kl":
        return (torch.xlogy(rel, rel) - rel * torch.log(att + eps)).sum(-1)
    if kind == "ce":
        return -(rel * torch.log(att + eps)).sum(-1)
    if kind == "mse":
        return (att - rel).pow(2).sum(-1) * att.shape[-1]
    raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")


def visible_relevance(rel: Tensor, ids_keep: Tensor) -> Tensor:
    """Restrict ``(B, P)`` (or ``(B, Gh, Gw)``) relevance to the visible patches ``ids_keep (B, V)`` of a masked
    model and renormalise: ``(B, V)`` summing to 1 (uniform where no relevance survives the mask)."""
    r = rel.flatten(1).gather(1, ids_keep)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp_min(1e-12), torch.full_like(r, 1.0 / r.shape[-1]))


class SiftGuidance:
    """Guide the attention of chosen blocks of a timm ViT toward a patch relevance distribution.

    Args:
        model: a timm ``VisionTransformer`` (or DeiT / EVA / any model with ``.blocks[i].attn`` of a supported
            class). Class, distillation and register tokens are found from the model.
        layers: block indices to guide; negative counts from the end.
        heads: heads to average (default all).
        weight: loss multiplier. ``weight == 0`` makes the plugin inert: no capture, the model keeps fused
            attention everywhere, and training is bit-identical to the baseline.
        attention: ``cls`` (class token -> patches), ``mean`` (attention received by each patch) or ``auto``
            (``cls`` when the model has a class token).
        divergence: ``kl``, ``ce`` or ``mse``.
        schedule: a :class:`GuidanceSchedule` (or its kwargs as a dict); default constant.
    """

    def __init__(
        self, model: nn.Module, layers: int | Sequence[int] = -1, heads: Sequence[int] | None = None,
        weight: float = 1.0, attention: str = "auto", divergence: str = "kl",
        schedule: GuidanceSchedule | dict | None = None, eps: float = 1e-8,
    ) -> None:
        if weight < 0:
            raise ValueError(f"guidance weight must be >= 0, got {weight}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
        pt = prefix_tokens(model)
        self.num_prefix, self.cls_index = pt["num_prefix"], pt["cls_index"]
        if attention == "auto":
            attention = "cls" if self.cls_index >= 0 else "mean"
        if attention not in ("cls", "mean"):
            raise ValueError(f"unknown attention {attention!r}; expected 'cls', 'mean' or 'auto'")
        if attention == "cls" and self.cls_index < 0:
            raise ValueError(f"{type(model).__name__} has no class token: use attention='mean' (or 'auto')")
        self.attention = attention
        self.divergence = divergence
        self.weight = float(weight)
        self.heads = list(heads) if heads is not None else None
        num_heads = model.blocks[0].attn.num_heads if hasattr(model.blocks[0], "attn") else None
        if self.heads and num_heads and any(not -num_heads <= h < num_heads for h in self.heads):
            raise ValueError(f"heads {self.heads} out of range for {num_heads} heads")
        if isinstance(schedule, dict):
            schedule = GuidanceSchedule(**schedule)
        self.schedule = schedule or GuidanceSchedule()
        self.eps = eps
        self._capture = AttentionCapture(model, layers)
        self.layers = self._capture.layers
        self.step = 0  # used when loss() is called without an explicit step

    # ------------------------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """False when the weight is 0: capture() is then a no-op and loss() returns 0."""
        return self.weight > 0

    def current_weight(self, step: int | None = None) -> float:
        return self.weight * self.schedule(self.step if step is None else step)

    @contextlib.contextmanager
    def capture(self, force: bool = False) -> Iterator["SiftGuidance"]:
        """Record guided attention during the forward passes inside the context (``force`` also when inactive,
        e.g. to measure alignment of a baseline model)."""
        if not (self.active or force):
            yield self
            return
        with self._capture.capture():
            yield self

    def patch_attention(self) -> dict[int, Tensor]:
        """Captured attention reduced to patches: ``{layer: (B, P)}``."""
        if not self._capture.maps:
            raise RuntimeError(
                "no attention captured: run the model's forward inside `with guide.capture():` before loss()"
            )
        return {
            i: attention_to_patches(m.float(), self.num_prefix, self.cls_index, self.attention, self.heads)
            for i, m in self._capture.maps.items()
        }

    def divergence_value(self, relevance: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Unweighted divergence averaged over batch and guided layers (a scalar tensor).

        relevance: ``(B, Gh, Gw)`` or ``(B, P)`` distributions. ``ids_keep (B, V)``: for masked models (MAE),
        the indices of the visible patches the encoder saw; the relevance is restricted to them.
        """
        atts = self.patch_attention()
        rel = relevance.flatten(1).float()
        if ids_keep is not None:
            rel = visible_relevance(rel, ids_keep)
        values = []
        for layer, att in atts.items():
            if att.shape != rel.shape:
                raise ValueError(
                    f"block {layer} attends over {att.shape[1]} patch tokens (after {self.num_prefix} prefix "
                    f"tokens) but the relevance has {rel.shape[1]} = {tuple(relevance.shape[1:])} patches and "
                    f"batch {rel.shape[0]} vs {att.shape[0]}; compute relevance on the model's patch grid"
                )
            values.append(divergence(att, rel.to(att.device), self.divergence, self.eps).mean())
        return torch.stack(values).mean()

    def loss(self, relevance: Tensor, step: int | None = None, ids_keep: Tensor | None = None) -> Tensor:
        """``weight * schedule(step) * divergence``; clears the captured attention (one loss per capture).

        Without ``step`` an internal counter is used and advanced by one.
        """
        return self.terms(relevance, step, ids_keep)[0]

    def terms(self, relevance: Tensor, step: int | None = None,
              ids_keep: Tensor | None = None) -> tuple[Tensor, Tensor | None, float]:
        """``(loss, divergence, weight)``: what :meth:`loss` returns plus the unweighted divergence and the
        scheduled weight, for logging. Inactive guidance gives ``(0, None, 0.0)`` and captures nothing."""
        w = self.current_weight(step)
        if step is None:
            self.step += 1
        if not self.active:
            return relevance.new_zeros(()), None, 0.0
        try:
            div = self.divergence_value(relevance, ids_keep)
            return w * div, div, w
        finally:
            self.clear()

    def clear(self) -> None:
        """Drop the captured attention (after computing a loss or a metric from it)."""
        self._capture.clear()

    def detach(self) -> None:
        """Release the model; it is left exactly as it was before the plugin was attached."""
        self._capture.detach()

    def __repr__(self) -> str:
        return (f"SiftGuidance(layers={self.layers}, heads={self.heads}, weight={self.weight}, "
                f"attention={self.attention!r}, divergence={self.divergence!r}, schedule={self.schedule})")
