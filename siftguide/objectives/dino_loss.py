"""DINO self-distillation loss (Caron et al. 2021) over global and local views, with teacher centering.

For teacher views ``i`` (global crops only) and student views ``j`` (the same global crops first, in the same
order, then any local crops), with teacher and student outputs ``t_i, s_j`` of shape ``(B, D)``:

    p_i = softmax((t_i - c) / T_t(step)),   log q_j = log_softmax(s_j / T_s)
    loss = sum_{i, j, i != j} sum_b [ -sum_d p_i[b, d] log q_j[b, d] ] / (B * (n_t * n_s - n_t))

i.e. the cross-entropy averaged over the batch and over every (teacher view, student view) pair except a global
crop with itself. The teacher side carries no gradient. ``T_t`` warms up linearly from ``warmup_teacher_temp``
(step 0) to ``teacher_temp`` (step ``warmup_teacher_temp_steps - 1``, as DINO's ``np.linspace`` schedule).
The center ``c (1, D)`` is updated after the loss: ``c <- m c + (1 - m) mean_{i, b} t_i[b]`` (averaged over the
data-parallel ranks when ``torch.distributed`` is initialised). Matches ``lightly.loss.DINOLoss``
(``epoch=step``); the loss is computed in float32 at least (float64 inputs stay float64).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOLoss", "sum_across_ranks", "at_least_float32"]


def sum_across_ranks(x: Tensor) -> Tensor:
    """``x`` summed over the data-parallel ranks (in place, no host sync) when ``torch.distributed`` is
    initialised; ``x`` itself otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is in a lower precision (bf16 / fp16 under autocast), as it is otherwise."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DINOLoss(nn.Module):
    """Args: output_dim (D, the head's prototypes); warmup_teacher_temp, teacher_temp, warmup_teacher_temp_steps
    (the teacher temperature schedule, in optimizer steps; 0: ``teacher_temp`` throughout); student_temp;
    center_momentum (``m`` in [0, 1]). Buffer: ``center (1, D)``, zeros at start.

    ``forward(teacher_out, student_out, step)``: lists of ``(B, D)`` tensors (``n_t >= 1`` global teacher views,
    ``n_s >= n_t`` student views, at least two views overall) -> scalar loss (>= 0), then the center update.
    """

    center: Tensor

    def __init__(self, output_dim: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_steps: int = 0, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if output_dim < 1:
            raise ValueError(f"DINOLoss output_dim must be >= 1, got {output_dim}")
        for name, t in (("warmup_teacher_temp", warmup_teacher_temp), ("teacher_temp", teacher_temp),
                        ("student_temp", student_temp)):
            if not t > 0:
                raise ValueError(f"DINOLoss {name} must be > 0, got {t}")
        if warmup_teacher_temp_steps < 0:
            raise ValueError(f"DINOLoss warmup_teacher_temp_steps must be >= 0, got {warmup_teacher_temp_steps}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss center_momentum must be in [0, 1], got {center_momentum}")
        self.output_dim = output_dim
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, output_dim))

    def teacher_temperature(self, step: int) -> float:
        """``T_t(step)``: ``warmup + (teacher - warmup) * step / (n - 1)`` for ``step < n`` (``n`` =
        ``warmup_teacher_temp_steps``; ``warmup`` at step 0 when ``n = 1``), ``teacher_temp`` after."""
        n = self.warmup_teacher_temp_steps
        if step >= n:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / max(n - 1, 1)

    def forward(self, teacher_out: Sequence[Tensor], student_out: Sequence[Tensor], step: int) -> Tensor:
        t, s = self._stack(teacher_out, student_out)  # (n_t, B, D), (n_s, B, D)
        n_t, b = t.shape[:2]
        n_s = s.shape[0]
        p = F.softmax((t - self.center.to(t.dtype)) / self.teacher_temperature(step), dim=-1)
        log_q = F.log_softmax(s / self.student_temp, dim=-1)
        ce = -torch.einsum("ibd,jbd->ij", p, log_q)  # (n_t, n_s): cross-entropy summed over the batch
        same_view = torch.eye(n_t, n_s, dtype=torch.bool, device=ce.device)
        loss = ce.masked_fill(same_view, 0.0).sum() / (b * (n_t * n_s - n_t))
        self.update_center(t)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """``center <- m center + (1 - m) batch_center``, ``batch_center`` the mean of ``teacher_out (..., D)`` over
        all leading dimensions (views and batch), averaged over the ranks."""
        batch_center = at_least_float32(teacher_out.reshape(-1, self.output_dim)).mean(0, keepdim=True)
        batch_center = sum_across_ranks(batch_center) / _world_size()
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center.to(self.center.dtype), alpha=1.0 - m)

    def _stack(self, teacher_out: Sequence[Tensor], student_out: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if isinstance(teacher_out, Tensor) or isinstance(student_out, Tensor):
            raise ValueError("DINOLoss expects lists of (B, D) tensors, one per view, for teacher_out and student_out")
        n_t, n_s = len(teacher_out), len(student_out)
        if n_t < 1 or n_s < n_t or n_s < 2:
            raise ValueError(f"DINOLoss needs >= 1 teacher (global) views and at least as many student views, two "
                             f"or more overall, got {n_t} teacher and {n_s} student views")
        b = teacher_out[0].shape[0] if teacher_out[0].dim() == 2 else "B"
        for name, views in (("teacher_out", teacher_out), ("student_out", student_out)):
            for k, v in enumerate(views):
                if tuple(v.shape) != (b, self.output_dim):
                    raise ValueError(f"DINOLoss {name}[{k}] must have shape (B, D) = ({b}, {self.output_dim}) "
                                     f"(B of teacher_out[0]), got {tuple(v.shape)}")
        t, s = torch.stack(list(teacher_out)).detach(), torch.stack(list(student_out))
        return at_least_float32(t), at_least_float32(s)
