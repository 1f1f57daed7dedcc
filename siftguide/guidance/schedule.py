"""Step schedules: the multiplier of a guidance weight (or of the prior's beta) over optimizer steps."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GuidanceSchedule"]


@dataclass
class GuidanceSchedule:
    """Multiplier of the guidance weight over optimizer steps.

    kind: ``constant``; ``linear`` / ``cosine``: decay from 1 to ``end_factor`` over ``total_steps``;
    every kind first ramps up linearly over ``warmup_steps``. Steps past ``total_steps`` keep ``end_factor``.
    """

    kind: str = "constant"
    total_steps: int = 0
    warmup_steps: int = 0
    end_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown guidance schedule {self.kind!r}; expected constant, linear or cosine")
        if self.kind != "constant" and self.total_steps <= 0:
            raise ValueError(f"schedule {self.kind!r} needs total_steps > 0 (got {self.total_steps})")

    @classmethod
    def make(cls, schedule: "GuidanceSchedule | dict | None") -> "GuidanceSchedule":
        """A schedule from itself, its kwargs, or None (constant)."""
        if isinstance(schedule, GuidanceSchedule):
            return schedule
        return cls(**(schedule or {}))

    def __call__(self, step: int) -> float:
        f = 1.0
        if self.kind != "constant":
            t = min(max(step, 0) / self.total_steps, 1.0)
            decay = 1 - t if self.kind == "linear" else 0.5 * (1 + math.cos(math.pi * t))
            f = self.end_factor + (1 - self.end_factor) * decay
        if self.warmup_steps > 0 and step < self.warmup_steps:
            f *= (step + 1) / self.warmup_steps
        return f
