"""Step schedules: the multiplier of a guidance weight (or of the prior's beta), and of the learning rate, over
optimizer steps. :func:`cosine_decay` is the package's one cosine: :class:`GuidanceSchedule` and the learning-rate
schedule :func:`warmup_cosine` are built on it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

__all__ = ["GuidanceSchedule", "cosine_decay", "warmup_cosine"]


def cosine_decay(t: float, end_factor: float = 0.0) -> float:
    """Half-cosine decay from 1 at ``t <= 0`` to ``end_factor`` at ``t >= 1``:
    ``end_factor + (1 - end_factor) * (1 + cos(pi * t)) / 2``.

    >>> cosine_decay(0.5), cosine_decay(1.0, 0.2)
    (0.5, 0.2)
    """
    t = min(max(t, 0.0), 1.0)
    return end_factor + (1 - end_factor) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up over ``warmup_steps`` (``(step + 1) / warmup_steps``), then
    :func:`cosine_decay` to ``min_factor`` at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return cosine_decay((step - warmup_steps) / max(1, total_steps - warmup_steps), min_factor)

    return f


@dataclass
class GuidanceSchedule:
    """Multiplier of the guidance weight over optimizer steps.

    kind: ``constant``; ``linear`` / ``cosine``: decay from 1 to ``end_factor`` over the first ``fraction`` of
    ``total_steps`` (``total_steps`` is usually the run's length, ``trainer.max_steps``: ``fraction=0.5`` decays
    over the first half of any run); every kind first ramps up linearly over ``warmup_steps``. Later steps keep
    ``end_factor``.
    """

    kind: str = "constant"
    total_steps: int = 0
    warmup_steps: int = 0
    end_factor: float = 0.0
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown guidance schedule {self.kind!r}; expected constant, linear or cosine")
        if self.kind != "constant" and self.total_steps <= 0:
            raise ValueError(f"schedule {self.kind!r} needs total_steps > 0 (got {self.total_steps})")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"schedule fraction must be in (0, 1] (the share of total_steps the decay takes), "
                             f"got {self.fraction}")

    @property
    def decay_steps(self) -> float:
        """Steps over which the decay runs: ``fraction * total_steps``."""
        return self.fraction * self.total_steps

    @classmethod
    def make(cls, schedule: "GuidanceSchedule | dict | None") -> "GuidanceSchedule":
        """A schedule from itself, its kwargs, or None (constant)."""
        if isinstance(schedule, GuidanceSchedule):
            return schedule
        return cls(**(schedule or {}))

    def __call__(self, step: int) -> float:
        f = 1.0
        if self.kind == "linear":
            t = min(max(step, 0) / self.decay_steps, 1.0)
            f = self.end_factor + (1 - self.end_factor) * (1 - t)
        elif self.kind == "cosine":
            f = cosine_decay(step / self.decay_steps, self.end_factor)
        if self.warmup_steps > 0 and step < self.warmup_steps:
            f *= (step + 1) / self.warmup_steps
        return f
