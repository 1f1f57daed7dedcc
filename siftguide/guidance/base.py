"""What every guidance mode is: a small object that consumes the batch's relevance in declared places of the step.

A mode says what it does by overriding hooks of :class:`GuidanceMode` (each a no-op by default) and by a few
class attributes; :class:`~siftguide.guidance.Guidance` calls the hooks of every active mode and knows no
concrete class. Per training step, in this order (the optimizer step ``step`` is an argument of every hook; a mode
keeps no step of its own):

* :meth:`~GuidanceMode.select_tokens` ``(relevance, step, count) -> ids_keep (B, K) | None``: the patch tokens the
  encoder runs. Asked only of a mode with ``selects_tokens = True`` (at most one per run); ``count`` is the number
  of visible tokens a masked objective runs (MAE), None where the mode chooses it (token dropping); with a
  per-image budget :meth:`~GuidanceMode.keep_counts` ``(relevance, step) -> (B,) | None`` says how many of each
  row's first tokens are kept (the rest pad a static shape);
* :meth:`~GuidanceMode.patch_weights` ``(relevance, step) -> ((B, P), normalize) | None``: per-patch weights of the
  objective's reconstruction loss and how to normalise it (``weights_patches = True``);
* :meth:`~GuidanceMode.patch_mask` ``(relevance, step, counts) -> (B, P) bool``: the patches a masked-prediction
  objective's student sees masked, as many per image as the objective drew (``masks_patches = True``);
* :meth:`~GuidanceMode.forward_context` ``(relevance, stage, step, ids_keep)``: a context manager around the
  objective's forward (the prior's logit bias; the loss modes' attention capture). Contexts are entered in
  ascending ``forward_order`` (:data:`BIAS` before :data:`CAPTURE`, so a capture records the biased attention);
* :meth:`~GuidanceMode.loss_terms` ``(relevance, step, ids_keep) -> (loss, value, weight) | None``: a term added
  to the task loss (times the composite's ``weight``), logged as ``<name>_loss/_value/_weight``;
* :meth:`~GuidanceMode.logs` ``(step) -> {key: value}``: extra values, logged as ``<name>_<key>``.

What a mode needs of the objective is declared in ``requires`` and checked once (:meth:`~GuidanceMode.check`)
against the objective's declarations (:class:`~siftguide.objectives.base.Objective`): ``"token_subset"`` (the
objective runs any given subset of patch tokens: supervised), ``"masked_tokens"`` (a masked objective whose visible
tokens a mode may choose: MAE), ``"patch_weights"`` (a per-patch reconstruction loss), ``"patch_masks"`` (the
patches masked for the student: iBOT). Data flows one way: modes
hand tensors to the module, which hands them to the objective; no mode is called back from inside an objective.

``acts_in`` (``loss`` / ``forward`` / ``objective``) says where the mode acts; a ``loss`` mode is switched off by the
composite's ``weight == 0``. Modes take the timm ViT as their first constructor argument (Hydra builds them as
partials and the module passes the net), never import Lightning, and are off (bit-identical to the baseline) when
inactive.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..attention import AttentionCapture, attention_to_patches, prefix_tokens
from ..precision import fp32_region
from .schedule import GuidanceSchedule

__all__ = ["GuidanceMode", "AttentionLoss", "visible_relevance", "LossTerms", "BIAS", "CAPTURE", "REQUIREMENTS"]

LossTerms = tuple[Tensor, "Tensor | None", float]  # (weighted loss, unweighted value or None, scheduled weight)
BIAS, CAPTURE = 0, 10  # forward_order: contexts that change the attention, then those that record it
REQUIREMENTS = ("token_subset", "masked_tokens", "patch_weights", "patch_masks")  # what a mode may require of an objective


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
    selects_tokens = False  # True: select_tokens() chooses the encoder's patch tokens (at most one mode per run)
    weights_patches = False  # True: patch_weights() weights the objective's per-patch loss (at most one per run)
    masks_patches = False  # True: patch_mask() picks the patches the student sees masked (at most one per run)
    forward_order = CAPTURE  # order of forward_context() among the modes (ascending; BIAS before CAPTURE)
    requires: str | None = None  # what the objective must offer: one of REQUIREMENTS, or None
    objective_hint = ""  # said when check() finds an objective that cannot serve the mode ("use objective=mae")

    @property
    def active(self) -> bool:
        return True

    def needs_relevance(self, stage: str) -> bool:
        """Whether this mode reads ``batch["relevance"]`` at ``stage`` (``train`` / ``val`` / ``test``)."""
        return self.active and stage == "train"

    def check(self, objective: nn.Module) -> None:
        """Raise a ``ValueError`` when ``objective`` does not offer what this mode ``requires`` (its ``offers``), or
        when the mode acts inside the forward (``acts_in == "forward"``) of an objective whose views differ in size
        (multi-crop: ``objective.multi_view``)."""
        kind = type(objective).__name__
        if self.acts_in == "forward" and getattr(objective, "multi_view", False):
            raise ValueError(f"guidance mode {self.name} acts inside the forward, and objective {kind} runs views of "
                             f"different sizes (multi-crop): not supported; use a mode that acts on the loss or on "
                             f"the masks")
        if self.requires is None or self.requires in getattr(objective, "offers", ()):
            return
        hint = f"; {self.objective_hint}" if self.objective_hint else ""
        raise ValueError(f"guidance mode {self.name} cannot serve objective {kind}: the mode needs "
                         f"{self.requires!r}, and {kind} offers {sorted(getattr(objective, 'offers', ())) or 'none'}"
                         f"{hint}")

    # ------------------------------------------------------------------------------------------ the step's hooks
    def select_tokens(self, relevance: Tensor, step: int, count: int | None = None) -> Tensor | None:
        """``ids_keep (B, K)`` (sorted; in rank order with a per-image budget, :meth:`keep_counts`) patch tokens for
        this training step, or None (the objective's default). ``count``: the visible tokens a masked objective
        runs, None where the mode chooses how many."""
        return None

    def keep_counts(self, relevance: Tensor, step: int) -> Tensor | None:
        """``(B,)``: how many of the first tokens of each :meth:`select_tokens` row the image keeps (a per-image
        budget; the rest pad a static shape), or None: all of them."""
        return None

    def patch_weights(self, relevance: Tensor, step: int) -> tuple[Tensor, str] | None:
        """``(B, P)`` per-patch loss weights for this training step and their normalisation (``mask`` /
        ``weight``, :func:`~siftguide.objectives.base.weighted_patch_loss`), or None."""
        return None

    def patch_mask(self, relevance: Tensor, step: int, counts: Tensor) -> Tensor | None:
        """``(B, P)`` bool: the patches the student sees masked, ``counts (B,)`` of them per image, or None."""
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

    @property
    def active(self) -> bool:
        """False when the weight is 0: capture() is then a no-op and loss() returns 0."""
        return self.weight > 0

    def current_weight(self, step: int) -> float:
        return self.weight * self.schedule(step)

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

    def loss(self, relevance: Tensor, step: int, ids_keep: Tensor | None = None) -> Tensor:
        """``weight * schedule(step) * value`` for optimizer step ``step``; clears the captured attention (one loss
        per capture)."""
        return self.terms(relevance, step, ids_keep)[0]

    def terms(self, relevance: Tensor, step: int, ids_keep: Tensor | None = None) -> LossTerms:
        """``(loss, value, weight)``: what :meth:`loss` returns plus the unweighted value and the scheduled
        weight, for logging. Inactive guidance gives ``(0, None, 0.0)`` and captures nothing."""
        if not self.active:
            return relevance.new_zeros(()), None, 0.0
        w = self.current_weight(step)
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
