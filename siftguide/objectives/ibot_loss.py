"""iBOT masked-patch self-distillation loss (Zhou et al. 2022; DINOv2's ``iBOTPatchLoss``), static shapes.

Teacher and student patch outputs ``t, s (B, P, D)`` (the teacher saw the full view, the student the view with the
patches of ``mask (B, P)``, True = masked, replaced by its mask token), per masked patch:

    ce[b, p] = -sum_d softmax((t[b, p] - c) / T_t)[d] * log_softmax(s[b, p] / T_s)[d]
    loss = mean_b [ sum_p mask[b, p] ce[b, p] / max(1, sum_p mask[b, p]) ]

the cross-entropy averaged over each image's masked patches, then over all B images: an image without a masked
patch contributes 0 and still counts in the mean over B (iBOT's ``loss2.mean()``, DINOv2's and lightly's
``sum / B``). The teacher side carries no gradient. The center ``c (1, D)`` is updated after the loss with the
mean of the teacher's outputs at the masked patches of the whole batch (DINOv2 / lightly; iBOT's own code averages
all patches): ``c <- m c + (1 - m) sum_{b,p} mask t / sum_{b,p} mask``, sums taken over the data-parallel ranks;
the center is left as it is when no patch is masked anywhere. Matches ``lightly.loss.IBOTPatchLoss`` fed with
``t[mask], s[mask]``; computed in float32 at least, without boolean indexing (the caller's head runs on all P patches).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dino_loss import at_least_float32, sum_across_ranks

__all__ = ["IBOTPatchLoss"]


class IBOTPatchLoss(nn.Module):
    """Args: output_dim (D, the patch head's prototypes); teacher_temp (overridable per call, e.g. by a warm-up
    schedule); student_temp; center_momentum (``m`` in [0, 1]). Buffer: ``center (1, D)``, zeros at start.

    ``forward(teacher_out (B, P, D), student_out (B, P, D), mask (B, P) or (B, Gh, Gw) bool, teacher_temp=None)``
    -> scalar loss (>= 0), then the center update.
    """

    center: Tensor

    def __init__(self, output_dim: int, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        if output_dim < 1:
            raise ValueError(f"IBOTPatchLoss output_dim must be >= 1, got {output_dim}")
        for name, t in (("teacher_temp", teacher_temp), ("student_temp", student_temp)):
            if not t > 0:
                raise ValueError(f"IBOTPatchLoss {name} must be > 0, got {t}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"IBOTPatchLoss center_momentum must be in [0, 1], got {center_momentum}")
        self.output_dim, self.teacher_temp, self.student_temp = output_dim, teacher_temp, student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, output_dim))

    def forward(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor,
                teacher_temp: float | None = None) -> Tensor:
        m = self._check(teacher_out, student_out, mask)
        temp = self.teacher_temp if teacher_temp is None else teacher_temp
        if not temp > 0:
            raise ValueError(f"IBOTPatchLoss teacher_temp must be > 0, got {temp}")
        t = at_least_float32(teacher_out.detach())
        p = F.softmax((t - self.center.to(t.dtype)) / temp, dim=-1)
        log_q = F.log_softmax(at_least_float32(student_out) / self.student_temp, dim=-1)
        ce = -torch.einsum("bpd,bpd->bp", p, log_q)
        per_image = torch.where(m, ce, 0.0).sum(1) / m.sum(1).clamp_min(1)
        loss = per_image.mean()
        self.update_center(t, m)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor, mask: Tensor) -> None:
        """``center <- m center + (1 - m) batch_center``, ``batch_center`` the mean of ``teacher_out (B, P, D)`` over
        the patches where ``mask (B, P)`` is True, over all ranks; unchanged when no patch is masked."""
        t = at_least_float32(teacher_out)
        w = mask.reshape(t.shape[:2]).to(t.dtype)
        stats = torch.cat([torch.einsum("bp,bpd->d", w, t), w.sum().reshape(1)])
        stats = sum_across_ranks(stats)  # one all-reduce for the sum and the count
        total, count = stats[:-1].unsqueeze(0).to(self.center.dtype), stats[-1]
        updated = self.center * self.center_momentum + (total / count.clamp_min(1)) * (1.0 - self.center_momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))

    def _check(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor) -> Tensor:
        if teacher_out.dim() != 3 or teacher_out.shape[-1] != self.output_dim:
            raise ValueError(f"IBOTPatchLoss teacher_out must have shape (B, P, D) with D = {self.output_dim}, got "
                             f"{tuple(teacher_out.shape)}")
        b, p, _ = teacher_out.shape
        if student_out.shape != teacher_out.shape:
            raise ValueError(f"IBOTPatchLoss student_out must have the teacher's shape (B, P, D) = "
                             f"{(b, p, self.output_dim)}, got {tuple(student_out.shape)}")
        if mask.dtype != torch.bool or mask.dim() not in (2, 3) or mask.shape[0] != b or math.prod(mask.shape[1:]) != p:
            raise ValueError(f"IBOTPatchLoss mask must be a bool tensor of shape (B, P) = {(b, p)} or (B, Gh, Gw) with "
                             f"Gh * Gw = P, got {mask.dtype} {tuple(mask.shape)}")
        return mask.reshape(b, p)
