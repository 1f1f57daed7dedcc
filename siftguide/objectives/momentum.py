"""Momentum (EMA) teacher update and the step schedules of DINO / iBOT (momentum, teacher temperature).

``update_momentum`` runs every optimizer step: it works on lists of tensors (``torch._foreach_*``), without a host
sync. The schedules take and return Python numbers (no tensors).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

__all__ = ["update_momentum", "cosine_schedule", "linear_warmup_schedule"]


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """EMA of ``model`` into ``model_ema``, in place: ``p_ema = m * p_ema + (1 - m) * p`` for every parameter
    (``lerp`` with weight ``1 - m``: ``m = 0`` copies, ``m = 1`` keeps), buffers (BatchNorm statistics) copied.

    Both modules must have the same architecture (parameters and buffers in the same order and shapes);
    ``m`` in [0, 1].
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"update_momentum m must be in [0, 1], got {m}")
    params, ema_params = list(model.parameters()), list(model_ema.parameters())
    buffers, ema_buffers = list(model.buffers()), list(model_ema.buffers())
    if len(params) != len(ema_params) or len(buffers) != len(ema_buffers):
        raise ValueError(f"update_momentum needs two models of the same architecture, got {len(params)} and "
                         f"{len(ema_params)} parameters, {len(buffers)} and {len(ema_buffers)} buffers")
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - m)
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, buffers)


def cosine_schedule(step: int, max_steps: int, start_value: float, end_value: float,
                    period: int | None = None) -> float:
    """Cosine from ``start_value`` (step 0) to ``end_value`` (step ``max_steps - 1`` and after), as
    ``lightly.utils.scheduler.cosine_schedule``:

    ``end - (end - start) * (cos(pi * step / (max_steps - 1)) + 1) / 2``, ``end_value`` when ``max_steps <= 1`` or
    ``step >= max_steps - 1``; with ``period``: ``end - (end - start) * (cos(2 pi * step / period) + 1) / 2`` (a
    full cycle every ``period`` steps). DINO's teacher momentum: ``cosine_schedule(step, total, 0.996, 1.0)``.
    A ``step`` past ``max_steps`` (without ``period``) warns (RuntimeWarning).
    """
    if step < 0:
        raise ValueError(f"cosine_schedule step must be >= 0, got {step}")
    if max_steps < 0:
        raise ValueError(f"cosine_schedule max_steps must be >= 0, got {max_steps}")
    if period is not None and period <= 0:
        raise ValueError(f"cosine_schedule period must be >= 1, got {period}")
    if period is None and step > max_steps:
        warnings.warn(f"cosine_schedule step {step} exceeds max_steps {max_steps}", RuntimeWarning, stacklevel=2)
    if period is not None:
        return float(end_value - (end_value - start_value) * (math.cos(2 * math.pi * step / period) + 1) / 2)
    if max_steps <= 1 or step >= max_steps - 1:
        return float(end_value)
    return float(end_value - (end_value - start_value) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2)


def linear_warmup_schedule(step: int, warmup_steps: int, start_value: float, end_value: float) -> float:
    """Linear from ``start_value`` (step 0) to ``end_value`` (step ``warmup_steps`` and after), as
    ``lightly.utils.scheduler.linear_warmup_schedule`` (DINOv2's teacher temperature, e.g. 0.04 -> 0.07):
    ``start + step / warmup_steps * (end - start)`` while ``step < warmup_steps``.

    Needs ``warmup_steps >= 0``, ``step >= 0`` and ``0 <= start_value <= end_value``, ``end_value > 0``.
    """
    if warmup_steps < 0:
        raise ValueError(f"linear_warmup_schedule warmup_steps must be >= 0, got {warmup_steps}")
    if step < 0:
        raise ValueError(f"linear_warmup_schedule step must be >= 0, got {step}")
    if start_value < 0:
        raise ValueError(f"linear_warmup_schedule start_value must be >= 0, got {start_value}")
    if end_value <= 0:
        raise ValueError(f"linear_warmup_schedule end_value must be > 0, got {end_value}")
    if start_value > end_value:
        raise ValueError(f"linear_warmup_schedule start_value must be <= end_value, got {start_value} > {end_value}")
    if step < warmup_steps:
        return start_value + step / warmup_steps * (end_value - start_value)
    return end_value
