"""``Guidance``: several guidance modes in one run, all fed by the same ``batch["relevance"]``.

Per training step the composing module (or your loop) calls, in order::

    guidance.set_step(step)
    ids = guidance.select_tokens(rel)                  # token_drop (None: all tokens)
    with guidance.forward(rel, "train", ids):           # attention prior + capture for the loss modes
        out = objective(net, images, batch, "train", keep=ids)
    extra, logs = guidance.losses(rel, out.ids_keep)   # sum of the loss modes' weighted terms

Objective-side modes (masking, recon_weight) are bound once with :meth:`bind`. ``weight`` multiplies every loss
mode's term (``weight == 0``: the loss modes are inert). With no mode, or only inert ones, nothing is captured,
no relevance is needed, and training is bit-identical to the baseline.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

from torch import Tensor, nn

from .base import AttentionLoss, GuidanceMode
from .prior import AttentionPrior
from .token_drop import TokenDrop

__all__ = ["Guidance"]


class Guidance:
    """Args:
        model: the timm ViT.
        modes: ``{name: mode}``; a value may also be a factory ``model -> mode`` (Hydra partials).
        weight: multiplier of every loss mode's term.
    """

    def __init__(self, model: nn.Module,
                 modes: Mapping[str, GuidanceMode | Callable[[nn.Module], GuidanceMode]] | None = None,
                 weight: float = 1.0) -> None:
        if weight < 0:
            raise ValueError(f"guidance weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.modes: dict[str, GuidanceMode] = {}
        for name, m in (modes or {}).items():
            mode = m if isinstance(m, GuidanceMode) else m(model)
            if not isinstance(mode, GuidanceMode):
                raise TypeError(f"guidance mode {name!r} built a {type(mode).__name__}, not a GuidanceMode")
            self.modes[name] = mode
        drops = [n for n, m in self.modes.items() if isinstance(m, TokenDrop)]
        if len(drops) > 1:
            raise ValueError(f"at most one token_drop mode per run, got {drops}")
        self.step = 0

    # ------------------------------------------------------------------------------------------ which modes act
    def _on(self, m: GuidanceMode) -> bool:
        return m.active and (self.weight > 0 or not isinstance(m, AttentionLoss))

    @property
    def active(self) -> bool:
        return any(self._on(m) for m in self.modes.values())

    def active_modes(self) -> dict[str, GuidanceMode]:
        return {n: m for n, m in self.modes.items() if self._on(m)}

    def needs_relevance(self, stage: str) -> bool:
        return any(m.needs_relevance(stage) for m in self.active_modes().values())

    def bind(self, objective: nn.Module) -> None:
        for m in self.active_modes().values():
            m.bind(objective)

    def set_step(self, step: int) -> None:
        self.step = step
        for m in self.modes.values():
            m.set_step(step)

    # ------------------------------------------------------------------------------------------ the step
    def select_tokens(self, relevance: Tensor | None, step: int | None = None) -> Tensor | None:
        """Training ``ids_keep (B, K)`` from the token_drop mode, or None."""
        for m in self.active_modes().values():
            if isinstance(m, TokenDrop):
                if relevance is None:
                    raise ValueError("token_drop needs batch['relevance']")
                return m.select(relevance, self.step if step is None else step)
        return None

    @contextlib.contextmanager
    def forward(self, relevance: Tensor | None, stage: str = "train",
                ids_keep: Tensor | None = None) -> Iterator["Guidance"]:
        """Context for the objective's forward: the prior's logit bias and the loss modes' attention capture."""
        with contextlib.ExitStack() as stack:
            for m in self.active_modes().values():
                if isinstance(m, AttentionPrior) and m.needs_relevance(stage):
                    stack.enter_context(m.apply(relevance, self.step, ids_keep))
            if stage == "train":  # after the prior: capture records the biased attention the block uses
                for m in self.active_modes().values():
                    if isinstance(m, AttentionLoss):
                        stack.enter_context(m.capture())
            yield self

    def losses(self, relevance: Tensor | None, ids_keep: Tensor | None = None,
               step: int | None = None) -> tuple[Tensor | None, dict[str, Tensor | float]]:
        """``(sum of weighted loss terms or None, logs)``; logs hold each loss mode's ``<name>_loss``,
        ``<name>_value`` and ``<name>_weight``, and the forward modes' settings of this step."""
        step = self.step if step is None else step
        total, logs = None, {}
        for name, m in self.active_modes().items():
            if isinstance(m, AttentionLoss):
                loss, value, w = m.terms(relevance, step, ids_keep)
                loss = self.weight * loss
                total = loss if total is None else total + loss
                logs.update({f"{name}_loss": loss, f"{name}_value": value, f"{name}_weight": self.weight * w})
            elif isinstance(m, AttentionPrior):
                logs[f"{name}_beta"] = m.current_beta(step)
        return total, logs

    def clear(self) -> None:
        for m in self.modes.values():
            if isinstance(m, AttentionLoss):
                m.clear()

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={m!r}" for n, m in self.modes.items())
        return f"Guidance(weight={self.weight}, modes={{{inner}}})"
