"""Masked self-distillation (iBOT, Zhou et al. 2022): DINO's class-token loss plus a masked-patch loss.

On top of :class:`~siftguide.objectives.dino.DINOObjective`, the student sees its global views with some patches
replaced by a learned mask token: per image ``round(r P)`` patches with ``r`` uniform in ``mask_ratio``, and a share
``1 - masked_share`` of the images unmasked (:func:`~siftguide.guidance.patch_masks.draw_mask_counts`). Its head's
outputs at the masked patches are pulled toward the teacher's outputs at the same patches of the unmasked views
(:class:`~siftguide.objectives.ibot_loss.IBOTPatchLoss`, the teacher's temperature schedule shared with the class
token's, weight ``patch_loss_weight``); one head serves the class token and the patches.

Which patches are masked (:mod:`siftguide.guidance.patch_masks`): given by a guidance mode when one is active
(``attmask``: the most relevant patches of the relevance map, SIFT or a control), else the objective's own
``mask_pattern``: ``block`` (iBOT's default), ``random``, or ``attention``: AttMask proper, the patches the teacher's
class token attends to most in its last block, from the same teacher forward (``attention_hints``: AttMask-Hint).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..attention import AttentionCapture, attention_to_patches
from ..guidance.patch_masks import block_patch_mask, draw_mask_counts, random_patch_mask, relevance_patch_mask
from .base import Guided, ObjectiveOutput
from .dino import DINOObjective
from .ibot_loss import IBOTPatchLoss

__all__ = ["IBOTObjective", "MASK_PATTERNS"]

MASK_PATTERNS = ("block", "random", "attention")


class IBOTObjective(DINOObjective):
    """Args: those of :class:`~siftguide.objectives.dino.DINOObjective`, and mask_ratio ``[low, high]`` (in (0, 1)),
    masked_share (images masked at all), mask_pattern (the masks when no guidance mode gives them),
    attention_hints (``mask_pattern=attention``: AttMask-Hint's share), patch_loss_weight."""

    offers = frozenset({"patch_masks"})

    def __init__(self, mask_ratio: Sequence[float] = (0.1, 0.5), masked_share: float = 0.5,
                 mask_pattern: str = "block", attention_hints: float = 0.0, patch_loss_weight: float = 1.0,
                 **dino) -> None:
        super().__init__(**dino)
        lo, hi = (float(v) for v in mask_ratio)
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"objective.mask_ratio={[lo, hi]} must be [low, high] with 0 < low <= high < 1 (the share "
                             f"of a masked image's patches the student does not see)")
        if not 0.0 <= masked_share <= 1.0:
            raise ValueError(f"objective.masked_share={masked_share} must be in [0, 1] (the share of images masked)")
        if mask_pattern not in MASK_PATTERNS:
            raise ValueError(f"objective.mask_pattern={mask_pattern!r}: choose one of {MASK_PATTERNS}")
        if not 0.0 <= attention_hints < 1.0 or patch_loss_weight < 0:
            raise ValueError("objective.attention_hints must be in [0, 1) and objective.patch_loss_weight >= 0")
        self.mask_ratio, self.masked_share, self.mask_pattern = (lo, hi), masked_share, mask_pattern
        self.attention_hints, self.patch_loss_weight = attention_hints, patch_loss_weight
        self.patch_loss = IBOTPatchLoss(self.head_args["output_dim"], self.loss.teacher_temp, self.loss.student_temp,
                                        self.loss.center_momentum)

    def setup(self, net: nn.Module) -> None:
        super().setup(net)
        self.grid = tuple(net.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.mask_token = nn.Parameter(torch.zeros(net.embed_dim))  # iBOT's masked embedding, learned
        self._attention = AttentionCapture(self.teacher, layers=[-1]) if self.mask_pattern == "attention" else None

    def mask_counts(self, batch: int, device: torch.device | str) -> Tensor:
        """``(batch,)`` patches to mask per view (torch's global generator, as the other masks)."""
        return draw_mask_counts(batch, self.num_patches, *self.mask_ratio, self.masked_share, device=device)

    def encode_globals(self, net: nn.Module, images: Tensor, guided: Guided) -> Tensor:
        """The student's tokens of the global views, the patches of ``guided.patch_mask`` replaced by the mask token
        before the position embedding (timm's ``patch_embed``, ``_pos_embed``, ``norm_pre``, ``blocks``, ``norm``)."""
        x = net.patch_embed(images)  # (B, P, D), or (B, Gh, Gw, D) for dynamic image sizes
        mask = guided.patch_mask.reshape(*x.shape[:-1], 1)
        x = torch.where(mask, self.mask_token.to(x.dtype), x)
        return net.norm(net.blocks(net.norm_pre(net._pos_embed(x))))

    def _masks(self, teacher_attention: Tensor | None, n: int, device) -> Tensor:
        counts = self.mask_counts(n, device)
        if self.mask_pattern == "attention":
            return relevance_patch_mask(teacher_attention, counts, self.attention_hints)
        if self.mask_pattern == "random":
            return random_patch_mask(counts, self.grid)
        return block_patch_mask(counts, self.grid)

    def forward(self, net: nn.Module, images: Tensor, batch: dict, stage: str = "train", guided: Guided | None = None,
                step: int = 0) -> ObjectiveOutput:
        if stage != "train":
            return super().forward(net, images, batch, stage, guided, step)
        if not self._ready:
            raise RuntimeError("IBOTObjective.setup(net) must be called before use")
        guided, b = guided or Guided(), self._batch(batch, images)
        mask, attention = guided.patch_mask, None
        if mask is None and self._attention is not None:  # AttMask: the teacher's own class-token attention
            with self._attention.capture():
                teacher = self.teacher_tokens(images)
            attention = attention_to_patches(self._attention.maps[self._attention.layers[0]], self.num_prefix, 0,
                                             "cls")
            self._attention.clear()
        else:
            teacher = self.teacher_tokens(images)
        if mask is None:
            mask = self._masks(attention, images.shape[0], images.device)
        logits, probe = self.probe_loss(teacher[:b, 0], batch)
        student, tokens = self.student_outputs(net, images, batch, Guided(patch_mask=mask))
        with torch.no_grad():
            t_out = self.teacher_head(teacher)  # (G B, 1 + P, K): one head for the class token and the patches
        temp = self.loss.teacher_temperature(step)
        dino = self.loss(list(t_out[:, 0].chunk(images.shape[0] // b)), student, step)
        patch = self.patch_loss(t_out[:, self.num_prefix:], self.head(tokens[:, self.num_prefix:]), mask, temp)
        return ObjectiveOutput(loss=dino + self.patch_loss_weight * patch + probe, logits=logits, metrics={
            "dino_loss": dino.detach(), "ibot_loss": patch.detach(), "probe_loss": probe.detach(),
            "masked_share": mask.float().mean(), "teacher_temp": temp, "teacher_momentum": self.current_momentum(step)})
