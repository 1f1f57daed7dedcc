"""``Guidance``: several guidance modes in one run, all fed by the same ``batch["relevance"]``.

Per training step the composing module (or your loop) calls, in order::

    guidance.set_step(step)
    ids = guidance.select_tokens(rel)                  # the token-selecting mode, if any (None: all tokens)
    with guidance.forward(rel, "train", ids):           # every mode's forward_context (prior bias, then capture)
        out = objective(net, images, batch, "train", keep=ids)
    extra, logs = guidance.losses(rel, out.ids_keep)   # sum of the modes' weighted loss terms, and their logs

Objective-side modes (masking, recon_weight) are bound once with :meth:`bind`. ``weight`` multiplies every
mode's loss term (``weight == 0``: the ``loss`` modes are inert). With no mode, or only inert ones, nothing is
captured, no relevance is needed, and training is bit-identical to the baseline.

The composite only calls the hooks declared on :class:`~siftguide.guidance.base.GuidanceMode` and reads its
class attributes (``acts_in``, ``selects_tokens``, ``forward_order``, ``objective_hook``); it knows no concrete
mode, so a new mode is one file and one config.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

from torch import Tensor, nn

from .base import GuidanceMode

__all__ = ["Guidance"]


class Guidance:
    """Args:
        model: the timm ViT.
        modes: ``{name: mode}``; a value may also be a factory ``model -> mode`` (Hydra partials).
        weight: multiplier of every loss term.
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
        selectors = [n for n, m in self.modes.items() if m.selects_tokens]
        if len(selectors) > 1:
            raise ValueError(f"at most one token-selecting mode (token_drop) per run, got {selectors}")
        taken: dict[str, str] = {}
        for n, m in self.modes.items():
            if m.objective_hook is not None and taken.setdefault(m.objective_hook, n) != n:
                raise ValueError(f"guidance modes {taken[m.objective_hook]!r} and {n!r} both plug into the objective's "
                                 f"hook point {m.objective_hook!r}; at most one mode per hook point")
        self.step = 0

    # ------------------------------------------------------------------------------------------ which modes act
    def _on(self, m: GuidanceMode) -> bool:
        return m.active and (self.weight > 0 or m.acts_in != "loss")

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
        """Training ``ids_keep (B, K)`` from the token-selecting mode (``selects_tokens``), or None."""
        for name, m in self.active_modes().items():
            if m.selects_tokens:
                if relevance is None:
                    raise ValueError(f"{name} needs batch['relevance']")
                return m.select_tokens(relevance, self.step if step is None else step)
        return None

    @contextlib.contextmanager
    def forward(self, relevance: Tensor | None, stage: str = "train",
                ids_keep: Tensor | None = None) -> Iterator["Guidance"]:
        """Context for the objective's forward: the modes' ``forward_context`` entered in ascending
        ``forward_order`` (the prior's logit bias before the loss modes' capture, which so records the biased
        attention the block uses); ties keep the modes' order."""
        with contextlib.ExitStack() as stack:
            for m in sorted(self.active_modes().values(), key=lambda m: m.forward_order):
                stack.enter_context(m.forward_context(relevance, stage, self.step, ids_keep))
            yield self

    def losses(self, relevance: Tensor | None, ids_keep: Tensor | None = None,
               step: int | None = None) -> tuple[Tensor | None, dict[str, Tensor | float]]:
        """``(sum of weighted loss terms or None, logs)``; logs hold each loss term's ``<name>_loss``,
        ``<name>_value`` and ``<name>_weight``, and each mode's own :meth:`~GuidanceMode.logs` as ``<name>_<key>``."""
        step = self.step if step is None else step
        total, logs = None, {}
        for name, m in self.active_modes().items():
            terms = m.loss_terms(relevance, step, ids_keep)
            if terms is not None:
                loss, value, w = terms
                loss = self.weight * loss
                total = loss if total is None else total + loss
                logs.update({f"{name}_loss": loss, f"{name}_value": value, f"{name}_weight": self.weight * w})
            logs.update({f"{name}_{k}": v for k, v in m.logs(step).items()})
        return total, logs

    def clear(self) -> None:
        for m in self.modes.values():
            m.clear()

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={m!r}" for n, m in self.modes.items())
        return f"Guidance(weight={self.weight}, modes={{{inner}}})"
