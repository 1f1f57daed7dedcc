"""Pre-emption: SIGTERM (what a scheduler sends before it kills a job) and SIGINT (Ctrl+C) end a run at the current
step with its checkpoint written, so that ``ckpt_path=last`` loses nothing.

:class:`SignalStop` replaces the two signals' handlers while ``train`` runs: a signal only sets a flag (a second
Ctrl+C stops at once, the usual ``KeyboardInterrupt``). :class:`Preemption` reads the flag after each training step
and after each validation and ends the fit there (the epoch loop's ``max_steps`` is set to the current step: the
step in progress finishes, with its validation if one was due, and Lightning leaves the loop as at the end of a
run, without the extra validation ``should_stop`` would run). ``train`` then writes ``checkpoints/last.ckpt`` at
that step, ``results.json`` with ``"status": "interrupted"``, and exits with ``128 + signal`` (143 for SIGTERM,
130 for SIGINT) by raising :class:`Interrupted`.

Lightning's own SIGTERM handler (``lightning.pytorch.trainer.connectors.signal_connector``) raises
``SIGTERMException``, a ``SystemExit`` with exit code 0, at the end of the step or in the middle of a validation,
without a checkpoint: :class:`Preemption` installs :class:`SignalStop` again at ``on_train_start``, after Lightning
registered its own, and forwards the signal to Lightning's DDP worker processes as Lightning does. Under DDP the
ranks agree on the flag (one all-reduce of a boolean, which the host reads: a sync) every ``ddp_every`` steps (10)
and at each validation, so all of them stop at the same step, at most ``ddp_every - 1`` steps after the signal.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import lightning as L

__all__ = ["SignalStop", "Preemption", "Interrupted", "SIGNALS"]

log = logging.getLogger("siftguide.train")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """The run stopped on a signal, its checkpoint written (or, in set-up, before training: nothing to write); the
    process exit code is ``128 + signum``."""

    def __init__(self, signum: int, step: int, in_setup: bool = False) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.step, self.in_setup = int(signum), int(step), in_setup

    def __str__(self) -> str:
        if self.in_setup:
            return (f"{signal.Signals(self.signum).name} received during set-up, before training: stopped at once "
                    f"(nothing new to checkpoint; a keypoint cache being built resumes where it was)")
        return (f"{signal.Signals(self.signum).name} received: stopped at step {self.step}, checkpoint written; "
                f"resume with ckpt_path=last")


class SignalStop:
    """Handlers for SIGTERM and SIGINT that record the first signal (``signum``) instead of ending the process,
    once training has started (``armed``). Before that, during set-up (building the run, a keypoint cache that can
    take minutes), there is no step to finish and nothing new to checkpoint: the signal ends the run at once, by
    raising :class:`Interrupted` where the main thread is (a scheduler's grace period is often shorter than a
    cache build)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False  # set by Preemption when training starts
        self.trainer: L.Trainer | None = None  # set by Preemption: DDP worker processes get the signal too
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            return
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl+C: the user does not want to wait
                raise KeyboardInterrupt
            return
        self.signum = signum
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        if launcher is not None and hasattr(launcher, "kill"):  # Lightning's DDP worker processes
            launcher.kill(signum)
        if not self.armed:
            log.warning("%s received during set-up: the run stops now", signal.Signals(signum).name)
            raise Interrupted(signum, 0, in_setup=True)
        log.warning("%s received: the run stops after the current step and writes its checkpoint (Ctrl+C again to "
                    "stop at once, without one)", signal.Signals(signum).name)


class Preemption(L.Callback):
    """Ends the fit at the current step once :class:`SignalStop` recorded a signal (see the module docstring)."""

    def __init__(self, stop: SignalStop | None = None, ddp_every: int = 10) -> None:
        self.stop = stop or SignalStop()  # train() sets the one it installed before building the run
        # under DDP the ranks agree on stopping through a collective whose result the host must read: a sync, so
        # it happens every ddp_every optimizer steps (and at each validation), not at every step
        self.ddp_every = ddp_every

    def on_train_start(self, trainer, pl_module) -> None:
        self.stop.trainer = trainer
        self.stop.armed = True  # from here on a signal ends the run at a step boundary, with its checkpoint
        self.stop.install()  # after Lightning's own SIGTERM handler: ours replaces it for the training loop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size == 1 or trainer.global_step % self.ddp_every == 0:
            self._check(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":  # a validation inside fit
            self._check(trainer)

    def _check(self, trainer) -> None:
        requested = self.stop.requested
        if trainer.world_size > 1:  # every rank stops at the same step, or the next collective hangs
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
            if requested and self.stop.signum is None:
                self.stop.signum = signal.SIGTERM
        if requested:
            trainer.fit_loop.epoch_loop.max_steps = trainer.global_step  # end of fit after this step
