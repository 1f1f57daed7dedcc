"""What every guidance mode is: a small object that consumes the batch's relevance in declared places of the step.

A mode says what it does by overriding hooks of :class:`GuidanceMode` (each a no-op by default) and by a few
class attributes; :class:`~siftguide.guidance.Guidance` calls the hooks of every active mode and knows no
concrete class. Per training step, in this order:

* :meth:`~GuidanceMode.select_tokens` ``(relevance, step) -> ids_keep (B, K) | None``: the patch tokens the
  forward runs (token dropping). Only modes with ``selects_tokens = True`` are asked, and at most one per run;
* :meth:`~GuidanceMode.forward_context` ``(relevance, stage, step, ids_keep)``: a context manager around the
  objective's forward (the prior's logit bias; the loss modes' attention capture). Contexts are entered in
  ascending ``forward_order`` (:data:`BIAS` before :data:`CAPTURE`, so a capture records the biased attention);
* :meth:`~GuidanceMode.loss_terms` ``(relevance, step, ids_keep) -> (loss, value, weight) | None``: a term added
  to the task loss (times the composite's ``weight``), logged as ``<name>_loss/_value/_weight``;
* :meth:`~GuidanceMode.logs` ``(step) -> {key: value}``: extra values, logged as ``<name>_<key>``.

Objective-side modes name an objective hook point (``objective_hook = "masking"``); :meth:`~GuidanceMode.bind`
plugs the mode itself (a callable with the hook point's signature) into an objective that declares that point
(``Objective.hook_points``). ``acts_in`` (``loss`` / ``forward`` / ``objective``) says where the mode acts; a
``loss`` mode is switched off by the composite's ``weight == 0``.

Modes take the timm ViT as their first constructor argument (Hydra builds them as partials and the module
passes the net), never import Lightning, and are off (bit-identical to the baseline) when inactive.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..attention import AttentionCapture, attention_to_patches, prefix_tokens
from ..precision import fp32_region
from .schedule import GuidanceSchedule

__all__ = ["GuidanceMode", "AttentionLoss", "visible_relevance", "LossTerms", "BIAS", "CAPTURE"]

LossTerms = tuple[Tensor, "Tensor | None", float]  # (weighted loss, unweighted value or None, scheduled weight)
BIAS, CAPTURE = 0, 10  # forward_order: contexts that change the attention, then those that record it


def visible_relevance(rel: Tensor, ids_keep: Tensor) -> Tensor:
    """Restrict ``(B, P)`` (or ``(B, Gh, Gw)``) relevance to the visible patches ``ids_keep (B, V)`` of a masked
    model and renormalise: ``(B, V)`` summing to 1 (uniform where no relevance survives the mask)."""
    r = rel.flatten(1).gather(1, ids_keep)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp_min(1e-12), torch.full_like(r, 1.0 / r.shape[-1]))


class GuidanceMode:
    """Base class: declared hooks with no-op defaults (see the module docstring). A subclass overrides the ones
    it needs; ``active == False`` (its off switch) keeps it out of the step entirely."""

    name = "mode"  # the mode's config name (its file siftguide/guidance/<name>.py and configs/guidance/<name>.yaml)
    acts_in = "loss"  # loss | forward | objective; loss modes are off when the composite's weight is 0
    selects_tokens = False  # True: select_tokens() chooses the forward's patch tokens (at most one mode per run)
    forward_order = CAPTURE  # order of forward_context() among the modes (ascending; BIAS before CAPTURE)
    objective_hook: str | None = None  # the objective hook point this mode plugs into at bind() (e.g. "masking")
    objective_hint = ""  # said when bind() finds an objective that cannot serve the mode ("use objective=mae")

    @property
    def active(self) -> bool:
        return True

    def needs_relevance(self, stage: str) -> bool:
        """Whether this mode reads ``batch["relevance"]`` at ``stage`` (``train`` / ``val`` / ``test``)."""
        return self.active and stage == "train"

    def bind(self, objective: nn.Module) -> None:
        """Called once with the objective: checks that the objective can serve this mode and plugs the mode into
        its ``objective_hook`` point (``objective.set_hook(point, self)``)."""
        kind = type(objective).__name__
        hint = f"; {self.objective_hint}" if self.objective_hint else ""
        if self.selects_tokens and not getattr(objective, "supports_token_drop", False):
            raise ValueError(f"guidance mode {self.name} cannot serve objective {kind}: the mode selects the forward's "
                             f"patch tokens and {kind} does not run given tokens (supports_token_drop is False: it "
                             f"selects its own){hint}")
        if self.objective_hook is None:
            return
        points = getattr(objective, "hook_points", {})
        if self.objective_hook not in points:
            raise ValueError(f"guidance mode {self.name} cannot serve objective {kind}: it plugs into the hook point "
                             f"{self.objective_hook!r}, which {kind} does not declare (its hook_points: "
                             f"{sorted(points) or 'none'}){hint}")
        objective.set_hook(self.objective_hook, self)

    def set_step(self, step: int) -> None:
        """Called before each training step with the optimizer step (curricula, schedules)."""
        self.step = step

    # ------------------------------------------------------------------------------------------ the step's hooks
    def select_tokens(self, relevance: Tensor, step: int) -> Tensor | None:
        """``ids_keep (B, K)`` patch tokens for this training step, or None (all tokens). Asked only when the
        class declares ``selects_tokens = True``."""
        return None

    def forward_context(self, relevance: Tensor | None, stage: str, step: int,
                        ids_keep: Tensor | None = None) -> ContextManager:
        """A context manager around the objective's forward at ``stage`` (``ids_keep``: the selected tokens)."""
        return contextlib.nullcontext(self)

    def loss_terms(self, relevance: Tensor | None, step: int, ids_keep: Tensor | None = None) -> LossTerms | None:
        """``(loss, value, weight)`` after the training forward (``ids_keep``: the patches the encoder saw), or
        None: no term."""
        return None

    def logs(self, step: int) -> dict[str, Tensor | float]:
        """Extra values of this step, logged as ``train/guidance/<name>_<key>``."""
        return {}

    def clear(self) -> None:
        """Drop what the forward left behind (captured attention) without computing a loss."""


class AttentionLoss(GuidanceMode):
    """Shared machinery of the loss modes: attention capture in chosen blocks, weight and schedule.

    Subclasses implement :meth:`value` (the unweighted term from the captured attention). ``weight == 0`` makes
    the mode inert: no capture, fused attention everywhere, a zero loss.
    """

    def __init__(self, model: nn.Module, layers: int | Sequence[int] = -1, heads: Sequence[int] | None = None,
                 weight: float = 1.0, schedule: GuidanceSchedule | dict | None = None) -> None:
        if weight < 0:
            raise ValueError(f"guidance weight must be >= 0, got {weight}")
        pt = prefix_tokens(model)
        self.num_prefix, self.cls_index = pt["num_prefix"], pt["cls_index"]
        self.weight = float(weight)
        self.heads = list(heads) if heads is not None else None
        num_heads = getattr(getattr(model.blocks[0], "attn", None), "num_heads", None)
        if self.heads is not None and (not self.heads or (num_heads and any(
                not -num_heads <= h < num_heads for h in self.heads))):
            raise ValueError(f"heads {self.heads} out of range for {num_heads} heads (use 0..{(num_heads or 1) - 1})")
        self.schedule = GuidanceSchedule.make(schedule)
        self._capture = AttentionCapture(model, layers)
        self.layers = self._capture.layers
        self.step = 0  # used when loss() is called without an explicit step

    @property
    def active(self) -> bool:
        """False when the weight is 0: capture() is then a no-op and loss() returns 0."""
        return self.weight > 0

    def current_weight(self, step: int | None = None) -> float:
        return self.weight * self.schedule(self.step if step is None else step)

    @contextlib.contextmanager
    def capture(self, force: bool = False) -> Iterator["AttentionLoss"]:
        """Record guided attention during the forward passes inside the context (``force`` also when inactive,
        e.g. to measure alignment of a baseline model)."""
        if not (self.active or force):
            yield self
            return
        with self._capture.capture():
            yield self

    def maps(self) -> dict[int, Tensor]:
        """Captured attention probabilities ``{layer: (B, heads, N, N)}`` (fp32, chosen heads)."""
        if not self._capture.maps:
            raise RuntimeError(
                "no attention captured: run the model's forward inside `with guide.capture():` before loss()"
            )
        return {i: (m if self.heads is None else m[:, self.heads]).float() for i, m in self._capture.maps.items()}

    def patch_attention(self, kind: str = "cls", reduce_heads: bool = True) -> dict[int, Tensor]:
        """Captured attention reduced to patches: ``{layer: (B, P)}`` (``(B, h, P)`` without head reduction)."""
        return {i: attention_to_patches(m, self.num_prefix, self.cls_index, kind, reduce_heads=reduce_heads)
                for i, m in self.maps().items()}

    def value(self, relevance: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def forward_context(self, relevance: Tensor | None, stage: str, step: int,
                        ids_keep: Tensor | None = None) -> ContextManager:
        """Attention capture during the training forward (evaluation forwards are not captured)."""
        return self.capture() if stage == "train" else contextlib.nullcontext(self)

    def loss_terms(self, relevance: Tensor | None, step: int, ids_keep: Tensor | None = None) -> LossTerms:
        return self.terms(relevance, step, ids_keep)

    def loss(self, relevance: Tensor, step: int | None = None, ids_keep: Tensor | None = None) -> Tensor:
        """``weight * schedule(step) * value``; clears the captured attention (one loss per capture).

        Without ``step`` an internal counter is used and advanced by one.
        """
        return self.terms(relevance, step, ids_keep)[0]

    def terms(self, relevance: Tensor, step: int | None = None,
              ids_keep: Tensor | None = None) -> tuple[Tensor, Tensor | None, float]:
        """``(loss, value, weight)``: what :meth:`loss` returns plus the unweighted value and the scheduled
        weight, for logging. Inactive guidance gives ``(0, None, 0.0)`` and captures nothing."""
        w = self.current_weight(step)
        if step is None:
            self.step += 1
        if not self.active:
            return relevance.new_zeros(()), None, 0.0
        try:
            with fp32_region():  # the divergence in fp32 under bf16 / fp16 autocast (logs of small probabilities)
                v = self.value(relevance, ids_keep)
            return w * v, v, w
        finally:
            self.clear()

    def clear(self) -> None:
        """Drop the captured attention (after computing a loss or a metric from it)."""
        self._capture.clear()

    def detach(self) -> None:
        """Release the model; it is left exactly as it was before the plugin was attached."""
        self._capture.detach()

    @staticmethod
    def _check(att: Tensor, rel: Tensor, layer: int, num_prefix: int, relevance: Tensor) -> None:
        if att.shape[0] != rel.shape[0] or att.shape[-1] != rel.shape[-1]:
            raise ValueError(
                f"block {layer} attends over {att.shape[-1]} patch tokens (after {num_prefix} prefix tokens) but "
                f"the relevance has {rel.shape[-1]} = {tuple(relevance.shape[1:])} patches and batch {rel.shape[0]} "
                f"vs {att.shape[0]}; compute relevance on the model's patch grid"
            )
