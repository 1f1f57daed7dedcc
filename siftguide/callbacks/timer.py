"""Training wall-clock, throughput and the cost axis: the compute the training steps consumed (GPU time on CUDA,
process CPU time on a CPU), which other processes on the machine do not bend the way they bend wall-clock."""
from __future__ import annotations

import time

import lightning as L
import torch

__all__ = ["CostClock", "TrainTimer"]


class CostClock:
    """Compute spent by the training loop, on an axis that other processes cannot bend.

    CUDA: GPU time between consecutive marks, from CUDA events recorded on the current stream (no host sync per
    step: events are read once they have completed, and all of them in :meth:`total`). CPU: this process's CPU
    time (``time.process_time``: every thread of the process, loader workers excluded), which another process
    competing for the cores does not inflate the way it inflates wall-clock.
    """

    def __init__(self) -> None:
        self.total_s = 0.0
        self._cpu: float | None = None
        self._event = None  # last CUDA mark
        self._pending: list = []  # (start, end) CUDA event pairs not read yet

    def start(self, device: torch.device) -> None:
        """Open an interval (training starts or resumes after validation): what ran before is not counted."""
        if device.type == "cuda":
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        else:
            self._cpu = time.process_time()

    def mark(self, device: torch.device) -> None:
        """Close the interval since the last mark and open the next one (a training step ended)."""
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if self._event is not None:
                self._pending.append((self._event, end))
            self._event = end
            self._drain(block=False)
        else:
            now = time.process_time()
            if self._cpu is not None:
                self.total_s += now - self._cpu
            self._cpu = now

    def _drain(self, block: bool) -> None:
        while self._pending:
            start, end = self._pending[0]
            if not block and not end.query():
                return
            end.synchronize()
            self.total_s += start.elapsed_time(end) / 1000.0
            self._pending.pop(0)

    def total(self) -> float:
        """Seconds counted so far (waits for the GPU to finish the recorded steps)."""
        self._drain(block=True)
        return self.total_s


class TrainTimer(L.Callback):
    """Logs ``train/throughput`` (images per second over the last ``window`` steps), ``train/elapsed_s``
    (cumulative training wall-clock, validation excluded) and ``train/cost_s`` (the compute the training steps
    consumed: GPU time on CUDA, process CPU time on CPU, see :class:`CostClock`); at each validation ``val/step``,
    ``val/elapsed_s`` and ``val/cost_s`` (the x-axes of convergence curves).

    Time runs from one training batch's end to the next, so it covers data loading, the device pipeline in
    ``on_after_batch_transfer`` (augmentation, SIFT), forward, backward and the optimizer step; the clocks are
    paused during validation. No device synchronisation: on an accelerator, time between step ends over a
    window measures the steady-state rate of the queue. Compare runs on ``cost_s``: wall-clock follows whatever
    else runs on the machine (two runs of one config on shared cores differ by 2x), the cost does not.

    Lightning's ``ThroughputMonitor`` does not fit: it synchronises the GPU after every step; nor does its
    ``Timer``: its training time includes the validations run inside the fit.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.elapsed = 0.0
        self.cost = CostClock()
        self._last: float | None = None
        self._images = 0
        self._win_t = 0.0

    def _restart(self, pl_module) -> None:
        self._last = time.perf_counter()
        self.cost.start(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        self._restart(pl_module)  # a resumed run starts mid-epoch (no on_train_epoch_start)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._restart(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._restart(pl_module)
            return
        dt, self._last = now - self._last, now
        self.cost.mark(pl_module.device)
        self.elapsed += dt
        self._win_t += dt
        self._images += int(batch["image"].shape[0])
        pl_module.log("train/elapsed_s", self.elapsed, batch_size=1)
        pl_module.log("train/cost_s", self.cost.total_s, batch_size=1)  # the events read so far: no sync
        if (batch_idx + 1) % self.window == 0 and self._win_t > 0:
            pl_module.log("train/throughput", self._images / self._win_t, batch_size=1)
            self._images, self._win_t = 0, 0.0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            # explicit x-axes for convergence curves: optimizer steps done, training seconds and compute spent
            pl_module.log("val/step", float(trainer.global_step))
            pl_module.log("val/elapsed_s", self.elapsed)
            pl_module.log("val/cost_s", self.cost.total())

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart(pl_module)  # restart the clocks: validation time is not training time

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed, "cost": self.cost.total()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.elapsed = state_dict.get("elapsed", 0.0)
        self.cost.total_s = state_dict.get("cost", 0.0)
