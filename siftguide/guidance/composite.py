"""``Guidance``: several guidance modes in one run, all fed by the same ``batch["relevance"]``.

Per training step the composing module (or your loop) calls, in order, with the optimizer step ``step``::

    guided = guidance.guided(rel, step, objective)          # tokens, patch weights, patch masks (None: objective's own)
    with guidance.forward(rel, "train", step, guided.ids_keep):  # every mode's forward_context (prior, then capture)
        out = objective(net, images, batch, "train", guided, step)
    extra, logs = guidance.losses(rel, step, out.ids_keep)  # sum of the modes' weighted loss terms, and their logs

:meth:`Guidance.check` tells, once, whether an objective can serve every active mode. ``weight`` multiplies every
mode's loss term (``weight == 0``: the ``loss`` modes are inert). With no mode, or only inert ones, nothing is
captured, no relevance is needed, and training is bit-identical to the baseline.

The composite only calls the hooks declared on :class:`~siftguide.guidance.base.GuidanceMode` and reads its
class attributes (``acts_in``, ``selects_tokens``, ``weights_patches``, ``forward_order``, ``requires``); it knows no
concrete mode, so a new mode is one file and one config.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

from torch import Tensor, nn

from ..objectives.base import Guided
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
        for flag, what in (("selects_tokens", "token-selecting mode (token_drop, masking)"),
                           ("weights_patches", "patch-weighting mode (recon_weight)"),
                           ("masks_patches", "patch-masking mode (attmask)")):
            named = [n for n, m in self.modes.items() if getattr(m, flag)]
            if len(named) > 1:
                raise ValueError(f"at most one {what} per run, got {named}")

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

    def check(self, objective: nn.Module) -> None:
        """Raise a ``ValueError`` naming the first active mode ``objective`` cannot serve."""
        for m in self.active_modes().values():
            m.check(objective)

    # ------------------------------------------------------------------------------------------ the step
    def _one(self, flag: str, relevance: Tensor | None) -> tuple[str, GuidanceMode] | None:
        for name, m in self.active_modes().items():
            if getattr(m, flag):
                if relevance is None:
                    raise ValueError(f"{name} needs batch['relevance']")
                return name, m
        return None

    def select_tokens(self, relevance: Tensor | None, step: int, count: int | None = None) -> Tensor | None:
        """Training ``ids_keep (B, K)`` from the token-selecting mode, or None (see
        :meth:`GuidanceMode.select_tokens`)."""
        found = self._one("selects_tokens", relevance)
        return found[1].select_tokens(relevance, step, count) if found else None

    def patch_weights(self, relevance: Tensor | None, step: int) -> tuple[Tensor, str] | None:
        """Training per-patch loss weights ``(B, P)`` and their normalisation from the patch-weighting mode, or
        None."""
        found = self._one("weights_patches", relevance)
        return found[1].patch_weights(relevance, step) if found else None

    def patch_mask(self, relevance: Tensor | None, step: int, objective: nn.Module) -> Tensor | None:
        """Training patch masks ``(B, P)`` bool from the patch-masking mode, as many per image as
        ``objective.mask_counts`` draws (only when such a mode is active: no draw otherwise), or None."""
        found = self._one("masks_patches", relevance)
        if found is None:
            return None
        return found[1].patch_mask(relevance, step, objective.mask_counts(relevance.shape[0], relevance.device))

    def guided(self, relevance: Tensor | None, step: int, objective: nn.Module) -> Guided:
        """What the active modes hand ``objective`` for a training step (:class:`~siftguide.objectives.Guided`): the
        tokens to run (as many as ``objective.visible_count`` says, for a masked objective), per-patch weights and
        patch masks. Empty where no mode acts or no relevance is given."""
        if relevance is None:
            return Guided()
        weights = self.patch_weights(relevance, step)
        found = self._one("selects_tokens", relevance)
        selector = found[1] if found else None
        ids_keep = None if selector is None else selector.select_tokens(
            relevance, step, objective.visible_count(relevance.flatten(1).shape[1]))
        return Guided(ids_keep, *(weights or (None,)), patch_mask=self.patch_mask(relevance, step, objective),
                      keep_counts=None if ids_keep is None else selector.keep_counts(relevance, step))

    @contextlib.contextmanager
    def forward(self, relevance: Tensor | None, stage: str, step: int,
                ids_keep: Tensor | None = None) -> Iterator["Guidance"]:
        """Context for the objective's forward: the modes' ``forward_context`` entered in ascending
        ``forward_order`` (the prior's logit bias before the loss modes' capture, which so records the biased
        attention the block uses); ties keep the modes' order."""
        with contextlib.ExitStack() as stack:
            for m in sorted(self.active_modes().values(), key=lambda m: m.forward_order):
                stack.enter_context(m.forward_context(relevance, stage, step, ids_keep))
            yield self

    def losses(self, relevance: Tensor | None, step: int,
               ids_keep: Tensor | None = None) -> tuple[Tensor | None, dict[str, Tensor | float]]:
        """``(sum of weighted loss terms or None, logs)``; logs hold each loss term's ``<name>_loss``,
        ``<name>_value`` and ``<name>_weight``, and each mode's own :meth:`~GuidanceMode.logs` as ``<name>_<key>``."""
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
