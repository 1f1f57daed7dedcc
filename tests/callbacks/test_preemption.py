"""Pre-emption: SIGTERM and SIGINT end a run at the current step with its checkpoint written, results.json says
interrupted, the exit code is non-zero, and ``ckpt_path=last`` continues it as if nothing had happened (the real
signal to ``python train.py``: tests/e2e/test_preemption.py)."""
import json
import os
import signal
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

import siftguide.train as train_py
from siftguide.train import train
from tests.helpers import logged_rows


# 2 batches per epoch, validation (and a checkpoint) every 3 steps
FAST = ["data.train_subset=64", "data.val_size=64", "trainer.max_steps=7", "trainer.val_check_interval=3",
        "callbacks.knn=null", "callbacks.attention_divergence.batches=0", "trainer.log_every_n_steps=1"]


class _Send(L.Callback):
    """Sends ``sig`` to this process once: after optimizer step ``k`` or, with ``in_validation``, when the
    validation of step ``k`` starts."""

    def __init__(self, sig: int, k: int, in_validation: bool = False) -> None:
        self.sig, self.k, self.in_validation, self.sent = sig, k, in_validation, False

    def _send(self, trainer) -> None:
        if not self.sent and trainer.global_step == self.k:
            self.sent = True
            os.kill(os.getpid(), self.sig)

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.in_validation:
            self._send(trainer)

    def on_validation_start(self, trainer, *args) -> None:
        if self.in_validation:
            self._send(trainer)


def _with(monkeypatch, cb):
    build = train_py.build

    def with_cb(cfg, ckpt=None):
        module, data, trainer = build(cfg, ckpt)
        trainer.callbacks.append(cb)
        return module, data, trainer

    monkeypatch.setattr(train_py, "build", with_cb)


def _stopped(tiny_cfg, monkeypatch, cb: _Send, name: str) -> tuple[Path, int]:
    """The run of FAST sent a signal by ``cb``: its directory and exit code (asserting the handlers are given back)."""
    cfg = tiny_cfg(FAST, name=name)
    # the handlers the process had (SIGINT is SIG_IGN, not Python's default, in a job started in the background by a
    # non-interactive shell, as CI runners may do)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        _with(m, cb)
        with pytest.raises(SystemExit) as e:
            train(cfg)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    return Path(cfg.paths.output_dir), e.value.code


def _assert_interrupted(run: Path, sig: int, step: int) -> None:
    result = json.loads((run / "results.json").read_text())
    assert result["status"] == "interrupted" and result["signal"] == signal.Signals(sig).name
    assert result["global_step"] == step
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == step  # the current step, not the last validation's


def test_sigterm_saves_the_current_step_exits_non_zero_and_the_resume_is_exact(tiny_cfg, monkeypatch):
    """SIGTERM received during step 5 (sent after step 4's hooks; the last validation was at step 3): step 5 ends,
    its checkpoint is written, exit code 143; the resumed run logs exactly the uninterrupted run's rows."""
    full = tiny_cfg(FAST, name="full")
    train(full)
    run, code = _stopped(tiny_cfg, monkeypatch, _Send(signal.SIGTERM, 4), "stopped")
    assert code == 128 + signal.SIGTERM  # non-zero: a scheduler sees that the job did not finish
    _assert_interrupted(run, signal.SIGTERM, 5)
    train(tiny_cfg([*FAST, "ckpt_path=last"], name="stopped"))
    assert json.loads((run / "results.json").read_text())["status"] == "finished"
    a, b = logged_rows(Path(full.paths.output_dir)), logged_rows(run)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


def test_sigint_during_validation_stops_after_it(tiny_cfg, monkeypatch):
    """Ctrl+C in the validation of step 3: the validation finishes (its row is logged once), the run stops at step 3
    with exit code 130 instead of Lightning's exit code 1 without a checkpoint of the step."""
    run, code = _stopped(tiny_cfg, monkeypatch, _Send(signal.SIGINT, 3, in_validation=True), "ctrl_c")
    assert code == 128 + signal.SIGINT
    _assert_interrupted(run, signal.SIGINT, 3)
    m = pd.read_csv(run / "metrics.csv")
    assert m["val/acc"].notna().sum() == 1 and m["train/loss"].notna().sum() == 3


def test_a_signal_during_set_up_stops_at_once(tiny_cfg, monkeypatch):
    """SIGTERM while the run sets up (building a keypoint cache can take minutes): no step to finish, nothing new
    to checkpoint, and a scheduler's grace period is short: the run stops at once, results.json says interrupted,
    exit code 143."""
    import time

    from siftguide.callbacks import RelevanceSetup

    setup = RelevanceSetup.setup_relevance
    waited = []

    def slow_setup(self, trainer, module):  # a long cache build, signalled at its start
        os.kill(os.getpid(), signal.SIGTERM)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 20:  # the build would go on for 20 s
            time.sleep(0.01)
        waited.append(time.perf_counter() - t0)
        return setup(self, trainer, module)

    monkeypatch.setattr(RelevanceSetup, "setup_relevance", slow_setup)
    cfg = tiny_cfg(FAST, name="setup")
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        train(cfg)
    assert time.perf_counter() - t0 < 15 and not waited  # stopped inside the build, not after it
    assert e.value.code == 128 + signal.SIGTERM and "during set-up" in str(e.value)
    run = Path(cfg.paths.output_dir)
    result = json.loads((run / "results.json").read_text())
    assert result["status"] == "interrupted" and result["signal"] == "SIGTERM" and result["global_step"] == 0
    assert not (run / "checkpoints" / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
