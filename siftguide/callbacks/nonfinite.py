"""A stop on a non-finite training loss, without a host sync per step."""
from __future__ import annotations

import lightning as L
import torch

from ..run.errors import UserError

__all__ = ["NonFiniteLossError", "NonFiniteCheck"]


class NonFiniteLossError(UserError, RuntimeError):
    """Training stopped because the loss became NaN or infinite."""


class NonFiniteCheck(L.Callback):
    """Stops a run whose training loss became NaN or infinite, with the step and the likely causes.

    Without a host sync per step: the first non-finite step is kept in a device tensor and read every ``every``
    optimizer steps (``trainer.log_every_n_steps`` by default), before each validation, before any checkpoint is
    written (so no checkpoint of broken weights is saved) and at the end of training. The raised
    :class:`NonFiniteLossError` fails the run (``train.py`` marks it failed in ``results.json`` and wandb and exits
    non-zero).
    """

    def __init__(self, every: int | None = None) -> None:
        self.every = every
        self._first: torch.Tensor | None = None  # () long: first logged step with a non-finite loss, -1 if none

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not torch.is_tensor(loss):
            return
        if self._first is None or self._first.device != loss.device:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).all()
        # the step as metrics.csv labels this batch's row (optimizer steps done before it)
        self._first.masked_fill_(bad & (self._first < 0), trainer.global_step - 1)
        every = self.every or trainer.log_every_n_steps or 1
        if trainer.global_step % every == 0:
            self.check(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def check(self, trainer, pl_module) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite loss was seen (one host sync)."""
        if self._first is None:
            return
        first = int(self._first)
        if first < 0:
            return
        opt = trainer.optimizers[0] if trainer.optimizers else None
        group = opt.param_groups[0] if opt is not None else {}
        base, lr = group.get("initial_lr", group.get("lr", float("nan"))), group.get("lr", float("nan"))
        weight = getattr(getattr(pl_module, "guidance", None), "weight", None)
        causes = [f"a learning rate too high (optimizer.lr={base:g}, {lr:.3g} now: lower it, lengthen "
                  f"module.warmup_steps, keep trainer.gradient_clip_val)"]
        if weight:
            causes.append(f"a guidance weight too large for the task loss (guidance.weight={weight:g})")
        if str(trainer.precision) != "32-true":
            causes.append(f"overflow under reduced precision (trainer.precision={trainer.precision}: try bf16-mixed "
                          f"or 32-true)")
        raise NonFiniteLossError(
            f"train/loss became NaN or infinite at step {first} (the metrics.csv step; noticed at step "
            f"{trainer.global_step}). The run stops and is marked failed: its weights are no longer usable, and no "
            f"checkpoint is written from here on (checkpoints/last.ckpt, if any, is from before step {first}). "
            f"Likely causes: " + "; ".join(causes) + "."
        )
