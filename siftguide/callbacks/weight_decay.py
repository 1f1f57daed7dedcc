"""A weight-decay schedule (DINO): the decayed parameter group's weight decay along a cosine over the run."""
from __future__ import annotations

import lightning as L

from ..objectives.momentum import cosine_schedule

__all__ = ["WeightDecaySchedule"]


class WeightDecaySchedule(L.Callback):
    """Before each optimizer step, the weight decay of the parameter groups that have one goes from the optimizer's
    own value (``optimizer.weight_decay``) to ``end`` along a cosine over ``trainer.max_steps`` (DINO: 0.04 -> 0.4).
    ``end=None``: off (the optimizer's constant weight decay). Logged as ``train/weight_decay``."""

    def __init__(self, end: float | None = None) -> None:
        if end is not None and end < 0:
            raise ValueError(f"callbacks.weight_decay.end must be >= 0 (or null: off), got {end}")
        self.end, self.start = end, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.end is None or not trainer.optimizers:
            return
        groups = [g for g in trainer.optimizers[0].param_groups if g.get("name") != "no_decay"]
        if self.start is None:  # the config's value (a resume applies a changed one: ResumeState)
            self.start = float(groups[0]["weight_decay"])
        wd = cosine_schedule(min(trainer.global_step, max(trainer.max_steps - 1, 0)), max(trainer.max_steps, 0),
                             self.start, self.end)
        for g in groups:
            g["weight_decay"] = wd
        pl_module.log("train/weight_decay", wd, batch_size=1)
