"""A step-based progress bar: optimizer steps done out of ``trainer.max_steps``, their rate and the time left."""
from __future__ import annotations

import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["StepProgressBar"]


def _set_n(bar: Tqdm, n: int) -> None:
    """Move ``bar`` to ``n`` (what Lightning's private ``_update_n`` does)."""
    if not bar.disable:
        bar.n = n
        bar.refresh()


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, but a step-bounded run (``trainer.max_steps > 0``, the default) shows one bar over
    the whole run: optimizer steps done out of ``max_steps``, their rate and the time left (a resumed run starts
    at its step). Epoch-bounded runs keep Lightning's per-epoch bar."""

    @staticmethod
    def _total(trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def init_train_tqdm(self) -> Tqdm:
        total = self._total(self.trainer)
        if not total:
            return super().init_train_tqdm()
        step = self.trainer.global_step  # a resumed run starts here: rate and time left count this process's steps
        return Tqdm(desc="Steps", total=total, initial=step, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *args) -> None:
        if not self._total(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        total = self._total(trainer)
        if not total:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = trainer.global_step
        if self._should_update(n, total):
            _set_n(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._total(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
