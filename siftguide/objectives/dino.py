"""Self-distillation without labels (DINO, Caron et al. 2021) on an unmodified timm ViT.

The student is the run's net with a :class:`~siftguide.objectives.dino_head.DINOProjectionHead`; the teacher is a copy
of both, never trained by gradients: after each optimizer step its weights follow the student's by an exponential
moving average (momentum ``momentum`` -> ``momentum_end`` along a cosine over ``total_steps``). Per training step, from
the multi-crop views of the data pipeline (:class:`~siftguide.data.MultiCropTransform`: ``G`` global views in
``images``, view-major, and ``batch["local_views"]``):

* the teacher's class-token outputs of the global views, softmax at temperature ``T_t`` (warmed up from
  ``warmup_teacher_temp`` over ``warmup_teacher_temp_steps``) after centring;
* the student's class-token outputs of every view, log-softmax at ``student_temp``;
* the loss: the cross-entropy between every teacher view and every other student view
  (:class:`~siftguide.objectives.dino_loss.DINOLoss`).

The last layer of the student's head keeps its initial weights for the first ``freeze_last_layer_steps`` steps.
Evaluation is on the teacher (what DINO reports): the kNN features (:meth:`DINOObjective.tokens`) and an online linear
probe on its stop-gradient class token (``val/acc``; trained alongside, it cannot change the networks).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Guided, Objective, ObjectiveOutput, encode
from .dino_head import DINOProjectionHead
from .dino_loss import DINOLoss
from .momentum import cosine_schedule, update_momentum

__all__ = ["DINOObjective"]


class DINOObjective(Objective):
    """Args: out_dim / hidden_dim / bottleneck_dim / norm_last_layer (the projection head); student_temp,
    teacher_temp, warmup_teacher_temp, warmup_teacher_temp_steps, center_momentum (the loss); momentum,
    momentum_end, total_steps (the teacher's EMA schedule); freeze_last_layer_steps; num_classes (the online probe,
    0: none)."""

    needs_labels = False
    multi_view = True  # global and local views of different sizes: forward-acting guidance modes cannot serve it

    def __init__(self, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 norm_last_layer: bool = True, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0, center_momentum: float = 0.9,
                 momentum: float = 0.996, momentum_end: float = 1.0, total_steps: int = 0,
                 freeze_last_layer_steps: int = 0, num_classes: int = 0) -> None:
        super().__init__()
        if not 0.0 <= momentum <= momentum_end <= 1.0:
            raise ValueError(f"objective.momentum={momentum} and objective.momentum_end={momentum_end} must satisfy "
                             f"0 <= momentum <= momentum_end <= 1 (the teacher's EMA)")
        if freeze_last_layer_steps < 0 or total_steps < 0:
            raise ValueError("objective.freeze_last_layer_steps and objective.total_steps must be >= 0")
        self.head_args = dict(hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, output_dim=out_dim,
                              norm_last_layer=norm_last_layer)
        self.loss = DINOLoss(out_dim, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_steps, student_temp,
                             center_momentum)
        self.momentum, self.momentum_end, self.total_steps = momentum, momentum_end, total_steps
        self.freeze_last_layer_steps, self.num_classes = freeze_last_layer_steps, num_classes
        self._ready = False

    def setup(self, net: nn.Module) -> None:
        super().setup(net)
        if getattr(net, "cls_token", None) is None:
            raise ValueError(f"objective={type(self).__name__} needs a ViT with a class token")
        self.head = DINOProjectionHead(net.embed_dim, **self.head_args)
        # the teacher starts as the student and is never trained by gradients (only the EMA moves it)
        self.teacher, self.teacher_head = copy.deepcopy(net), copy.deepcopy(self.head)
        for p in (*self.teacher.parameters(), *self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.probe = nn.Linear(net.embed_dim, self.num_classes) if self.num_classes > 0 else None
        self._ready = True

    # ------------------------------------------------------------------------------------------------------------
    def teacher_tokens(self, images: Tensor) -> Tensor:
        """The teacher's final tokens ``(B, 1 + P, D)`` (no gradient)."""
        with torch.no_grad():
            return encode(self.teacher, images, None, self.num_prefix)

    def evaluated(self, net: nn.Module) -> nn.Module:
        return self.teacher

    def tokens(self, net: nn.Module, images: Tensor) -> Tensor:
        """The teacher's tokens of full images: what kNN evaluates."""
        self.teacher.eval()
        return self.teacher_tokens(images)

    def encode_globals(self, net: nn.Module, images: Tensor, guided: Guided) -> Tensor:
        """The student's tokens ``(G * B, 1 + P, D)`` of the global views (iBOT masks some of their patches)."""
        return encode(net, images, None, self.num_prefix)

    def student_outputs(self, net: nn.Module, images: Tensor, batch: dict, guided: Guided) -> tuple[list, Tensor]:
        """``([head output (B, K) per view: the global ones, then the local ones], student global tokens)``."""
        b, local = self._batch(batch, images), batch.get("local_views")
        # the local views first: a guidance mode that captures attention keeps the last forward, the global views'
        local_out = [] if local is None else list(self.head(encode(net, local, None, self.num_prefix)[:, 0]).chunk(
            local.shape[0] // b))
        tokens = self.encode_globals(net, images, guided)
        return list(self.head(tokens[:, 0]).chunk(images.shape[0] // b)) + local_out, tokens

    @staticmethod
    def _batch(batch: dict, images: Tensor) -> int:
        """Images per view: the labels' (or indices') count; all of ``images`` when the batch carries neither."""
        for key in ("label", "index"):
            if batch.get(key) is not None:
                return len(batch[key])
        return images.shape[0]

    def probe_loss(self, features: Tensor, batch: dict) -> tuple[Tensor | None, Tensor]:
        """``(logits, loss)`` of the online linear probe on stop-gradient teacher features ``(B, D)`` (labels -1 do
        not train it); ``(None, 0)`` without a probe or labels."""
        labels = batch.get("label")
        if self.probe is None or labels is None:
            return None, features.new_zeros(())
        logits = self.probe(features.detach())
        labelled = (labels >= 0).float()
        ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        return logits, (ce * labelled).sum() / labelled.sum().clamp_min(1.0)

    def forward(self, net: nn.Module, images: Tensor, batch: dict, stage: str = "train", guided: Guided | None = None,
                step: int = 0) -> ObjectiveOutput:
        if not self._ready:
            raise RuntimeError(f"{type(self).__name__}.setup(net) must be called before use")
        self.check_stage(stage)
        b = self._batch(batch, images)
        teacher = self.teacher_tokens(images)
        logits, probe = self.probe_loss(teacher[:b, 0], batch)
        if stage != "train":
            return ObjectiveOutput(loss=probe, logits=logits, metrics={"probe_loss": probe.detach()})
        student, _ = self.student_outputs(net, images, batch, guided or Guided())
        with torch.no_grad():
            t_out = list(self.teacher_head(teacher[:, 0]).chunk(images.shape[0] // b))
        dino = self.loss(t_out, student, step)
        return ObjectiveOutput(loss=dino + probe, logits=logits, metrics={
            "dino_loss": dino.detach(), "probe_loss": probe.detach(), "teacher_temp": self.loss.teacher_temperature(step),
            "teacher_momentum": self.current_momentum(step)})

    # ------------------------------------------------------------------------------------------------------------
    def current_momentum(self, step: int) -> float:
        return cosine_schedule(min(step, max(self.total_steps - 1, 0)), self.total_steps, self.momentum,
                               self.momentum_end)

    def on_train_batch_end(self, net: nn.Module, step: int) -> None:
        """The teacher follows the student (EMA at this step's momentum)."""
        m = self.current_momentum(step)
        update_momentum(net, self.teacher, m)
        update_momentum(self.head, self.teacher_head, m)

    def before_optimizer_step(self, step: int) -> None:
        self.head.cancel_last_layer_gradients(step, self.freeze_last_layer_steps)

    def extra_repr(self) -> str:
        return (f"head={self.head_args}, student_temp={self.loss.student_temp}, teacher_temp={self.loss.teacher_temp}, "
                f"momentum={self.momentum}->{self.momentum_end}, freeze_last_layer_steps={self.freeze_last_layer_steps}")
