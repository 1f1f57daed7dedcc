"""Mode ``prior``: a relevance bias on the attention logits of chosen blocks (SM-ViT style, no parameters).

For every key token ``j`` of the chosen blocks, ``logit_ij += beta(step) * log(V r_j + eps)`` for patch keys and
0 for prefix keys (class/register tokens), where ``r`` is the relevance restricted to the ``V`` patches present
(all, or the kept ones after token dropping) and renormalised. ``V r_j`` is 1 for a uniform map, so a uniform
relevance leaves every logit unchanged; keypoint-free patches get ``beta * log(eps)``. ``beta`` follows a
schedule (default: cosine decay to 0 over training, so the network ends on its own attention). Off at
evaluation unless ``at_eval=True``; the same mechanism serves inference prompting.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..attention import AttentionBias, prefix_tokens
from .base import BIAS, GuidanceMode, visible_relevance
from .schedule import GuidanceSchedule

__all__ = ["AttentionPrior", "relevance_bias"]


def relevance_bias(relevance: Tensor, num_prefix: int, beta: float, eps: float = 0.1,
                   ids_keep: Tensor | None = None) -> Tensor:
    """Key bias ``(B, num_prefix + V)``: 0 for prefix tokens, ``beta * log(V r + eps)`` for patches."""
    if eps <= 0:
        raise ValueError(f"prior eps must be > 0, got {eps}")
    r = relevance.flatten(1).float()
    if ids_keep is not None:
        r = visible_relevance(r, ids_keep)
    v = r.shape[1]
    patch = beta * torch.log(v * r + eps)
    return torch.cat([patch.new_zeros(r.shape[0], num_prefix), patch], dim=1)


class AttentionPrior(GuidanceMode):
    """Args: model; layers (blocks whose logits get the bias); beta (strength); schedule (multiplier of beta;
    default cosine decay to 0 over ``total_steps``); eps; at_eval (also bias validation/test forwards)."""

    acts_in = "forward"
    name = "prior"
    forward_order = BIAS  # before the loss modes' capture, which then records the biased attention

    def __init__(self, model: nn.Module, layers: int | Sequence[int] = -1, beta: float = 1.0,
                 schedule: GuidanceSchedule | dict | None = None, eps: float = 0.1, at_eval: bool = False) -> None:
        if beta < 0:
            raise ValueError(f"prior beta must be >= 0, got {beta}")
        if eps <= 0:
            raise ValueError(f"prior eps must be > 0, got {eps}")
        self.bias = AttentionBias(model, layers)
        self.layers = self.bias.layers
        self.num_prefix = prefix_tokens(model)["num_prefix"]
        self.beta, self.eps, self.at_eval = float(beta), float(eps), at_eval
        self.schedule = GuidanceSchedule.make(schedule)

    @property
    def active(self) -> bool:
        return self.beta > 0

    def needs_relevance(self, stage: str) -> bool:
        return self.active and (stage == "train" or self.at_eval)

    def current_beta(self, step: int) -> float:
        return self.beta * self.schedule(step)

    @contextlib.contextmanager
    def apply(self, relevance: Tensor, step: int = 0, ids_keep: Tensor | None = None,
              beta: float | None = None) -> Iterator["AttentionPrior"]:
        """Within the context the chosen blocks' logits carry the bias of ``relevance (B, Gh, Gw)``, with the
        strength of optimizer step ``step`` (or ``beta`` when given)."""
        b = self.current_beta(step) if beta is None else beta
        if not self.active or b == 0:
            yield self
            return
        bias = relevance_bias(relevance, self.num_prefix, b, self.eps, ids_keep)

        def bias_fn(n: int) -> Tensor:
            if n != bias.shape[1]:
                raise ValueError(f"prior: the blocks see {n} tokens but the relevance gives {bias.shape[1]} "
                                 f"({self.num_prefix} prefix + patches); pass ids_keep for shortened sequences")
            return bias

        with self.bias.apply(bias_fn):
            yield self

    def forward_context(self, relevance: Tensor | None, stage: str, step: int,
                        ids_keep: Tensor | None = None) -> ContextManager:
        """The bias during training forwards (and evaluation ones with ``at_eval``)."""
        if not self.needs_relevance(stage):
            return contextlib.nullcontext(self)
        return self.apply(relevance, step, ids_keep)

    def logs(self, step: int) -> dict[str, float]:
        return {"beta": self.current_beta(step)}

    def __repr__(self) -> str:
        return f"AttentionPrior(layers={self.layers}, beta={self.beta}, eps={self.eps}, schedule={self.schedule})"
