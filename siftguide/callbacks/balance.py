"""A guidance term that drowns the task loss: warned once, without a host sync per step.

With ``guidance.weight`` (or a mode's weight) far too large for the task loss, training follows the guidance alone
and the model stays at chance, with no error. :class:`GuidanceBalance` keeps, on the device, the smallest ratio of
each guidance term (the loss modes' weighted ``<mode>_loss``) to the task loss over the steps of a logging window
(``trainer.log_every_n_steps``), reads it once at the window's end (when Lightning syncs to log anyway), and warns
once per run when a term was more than ``ratio`` times the task loss at every step of a whole window.
"""
from __future__ import annotations

import logging

import lightning as L
import torch

__all__ = ["GuidanceBalance"]

log = logging.getLogger("siftguide.train")


class GuidanceBalance(L.Callback):
    """Args:
        ratio: a term above ``ratio`` x the task loss at every step of a logging window is warned about.

    Reads the training step's output: ``{"task_loss", "guidance_terms": {name: weighted term}}``, detached."""

    def __init__(self, ratio: float = 100.0) -> None:
        self.ratio = ratio
        self.warned = False
        self._min: dict[str, torch.Tensor] = {}  # smallest term / task loss of the window, on the device
        self._steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.warned or not isinstance(outputs, dict) or "guidance_terms" not in outputs:
            return
        task, guidance = outputs["task_loss"], outputs["guidance_terms"]
        if not guidance:
            return
        task = task.detach().float().abs().clamp_min(torch.finfo(torch.float32).tiny)
        for name, term in guidance.items():
            r = term.detach().float().abs() / task
            self._min[name] = torch.minimum(self._min[name], r) if name in self._min else r
        self._steps += 1
        every = max(1, int(trainer.log_every_n_steps or 1))
        if trainer.global_step % every:
            return
        whole, lows = self._steps >= every, self._min  # a window cut by a resume or an empty batch is not judged
        self._min, self._steps = {}, 0
        if not whole:
            return
        over = {n: float(r) for n, r in lows.items() if float(r) > self.ratio}  # one host sync per window
        if over and trainer.is_global_zero:
            self.warned = True
            weight = getattr(getattr(pl_module, "guidance", None), "weight", None)
            log.warning(
                "guidance dominates the task loss: %s at every step of the %d steps up to step %d; the task barely "
                "trains (the model may stay at chance). Lower guidance.weight (now %s) or the mode's own weight",
                ", ".join(f"{n} >= {r:.0f}x the task loss" for n, r in over.items()), every, trainer.global_step,
                weight)
