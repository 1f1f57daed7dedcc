"""A step-based progress bar: optimizer steps done out of the run's steps, their rate and the time left."""
from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

__all__ = ["StepProgressBar"]


class StepProgressBar(ProgressBar):
    """One bar over the whole run (Lightning's public :class:`~lightning.pytorch.callbacks.ProgressBar` interface
    and a tqdm bar): optimizer steps done out of ``trainer.max_steps`` (or the estimated steps of an epoch-bounded
    run), their rate, the time left and the progress bar metrics (``train/loss``, ``train/acc``, ``val/acc``). A
    resumed run starts at its step: rate and time left count this process's steps. Validation shows no bar of its
    own."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__()
        self.refresh_rate, self._enabled, self.bar = max(1, int(refresh_rate)), True, None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else \
            int(trainer.estimated_stepping_batches)
        self.bar = tqdm(desc="Steps", total=total, initial=trainer.global_step, disable=not self.is_enabled,
                        leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = trainer.global_step
        if self.bar is None or self.bar.disable or (n % self.refresh_rate and n != self.bar.total):
            return
        self.bar.n = n
        self.bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        self.bar.refresh()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
