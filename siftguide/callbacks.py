"""Small Lightning callbacks: training throughput and training wall-clock."""
from __future__ import annotations

import time

import lightning as L


class TrainTimer(L.Callback):
    """Logs ``train/throughput`` (images per second over the last ``window`` steps) and ``train/elapsed_s``
    (cumulative training wall-clock, validation excluded, so runs compare on the time spent training).

    Time runs from one training batch's end to the next, so it covers data loading, the device pipeline in
    ``on_after_batch_transfer`` (augmentation, SIFT), forward, backward and the optimizer step; the clock is
    paused during validation. No device synchronisation: on an accelerator, time between step ends over a
    window measures the steady-state rate of the queue.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.elapsed = 0.0
        self._last: float | None = None
        self._images = 0
        self._win_t = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._last = now
            return
        dt, self._last = now - self._last, now
        self.elapsed += dt
        self._win_t += dt
        self._images += int(batch["image"].shape[0])
        pl_module.log("train/elapsed_s", self.elapsed, batch_size=1)
        if (batch_idx + 1) % self.window == 0 and self._win_t > 0:
            pl_module.log("train/throughput", self._images / self._win_t, batch_size=1)
            self._images, self._win_t = 0, 0.0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            # explicit x-axes for convergence curves: optimizer steps done and training seconds spent
            pl_module.log("val/step", float(trainer.global_step))
            pl_module.log("val/elapsed_s", self.elapsed)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()  # restart the clock: validation time is not training time

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.elapsed = state_dict.get("elapsed", 0.0)


class ValidateAtEnd(L.Callback):
    """Remembers the last validated optimizer step, so that a run stopped between validations
    (``trainer.max_steps``) is validated once more at its final step: ``val/*`` is always written."""

    def __init__(self) -> None:
        self.last_step = -1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.last_step = trainer.global_step

    @staticmethod
    def run(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        cb = next((c for c in trainer.callbacks if isinstance(c, ValidateAtEnd)), None)
        if cb is not None and cb.last_step != trainer.global_step and trainer.global_step > 0:
            trainer.validate(module, datamodule=datamodule, verbose=False)
