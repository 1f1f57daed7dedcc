"""Small Lightning callbacks: training throughput and wall-clock, validation at the final step, a stop on a
non-finite loss, and a step-based progress bar."""
from __future__ import annotations

import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n


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


class ValidateAtEnd(L.Callback):
    """Remembers the last validated optimizer step, so that a run stopped between validations
    (``trainer.max_steps``) is validated once more at its final step: ``val/*`` is always written."""

    def __init__(self) -> None:
        self.last_step = -1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.last_step = trainer.global_step

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}  # a resumed run that ends where it was saved is not validated twice

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = state_dict.get("last_step", -1)

    @staticmethod
    def run(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        cb = next((c for c in trainer.callbacks if isinstance(c, ValidateAtEnd)), None)
        if cb is not None and cb.last_step != trainer.global_step and trainer.global_step > 0:
            trainer.validate(module, datamodule=datamodule, verbose=False)


class NonFiniteLossError(RuntimeError):
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
                  f"scheduler.warmup_steps, keep trainer.gradient_clip_val)"]
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
            _update_n(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._total(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
