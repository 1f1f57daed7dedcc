"""siftguide.callbacks.timer: elapsed time counts the device pipeline; the cost clock counts compute, not waiting
(the cost beside a CPU hog: tests/e2e/test_cost.py)."""
from pathlib import Path

import pandas as pd
import torch

from siftguide.train import train


def test_elapsed_time_includes_the_device_pipeline(tiny_cfg, monkeypatch):
    """train/elapsed_s must count on_after_batch_transfer (where SIFT runs), not only the training step."""
    import time as _time

    from siftguide.module import PretrainModule

    real = PretrainModule.on_after_batch_transfer

    def slow(self, batch, idx):
        if self.trainer.training:
            _time.sleep(0.2)
        return real(self, batch, idx)

    monkeypatch.setattr(PretrainModule, "on_after_batch_transfer", slow)
    cfg = tiny_cfg(["callbacks.knn=null"], name="slow")
    train(cfg)
    m = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
    assert m["train/elapsed_s"].max() >= 4 * 0.2
    # the cost axis counts compute, not waiting: the 0.8 s of sleep are wall-clock only
    cost, wall = m["train/cost_s"].max(), m["train/elapsed_s"].max()
    assert 0 < cost < wall - 0.5
    assert m["val/cost_s"].dropna().is_monotonic_increasing and m["val/cost_s"].max() <= cost + 1e-6


def test_cost_clock_counts_process_cpu_time_between_marks(monkeypatch):
    """On a CPU the cost is this process's CPU time between start/mark calls (a fake clock: exact values), and an
    interval opened after a pause (validation) does not count the pause."""
    import siftguide.callbacks.timer as timer

    now = [100.0]
    monkeypatch.setattr(timer.time, "process_time", lambda: now[0])
    clock, cpu = timer.CostClock(), torch.device("cpu")
    clock.start(cpu)
    now[0] += 2.5  # a step's work
    clock.mark(cpu)
    now[0] += 1.0
    clock.mark(cpu)
    assert clock.total() == 3.5
    now[0] += 50.0  # validation: not training
    clock.start(cpu)  # the clock reopens after it
    now[0] += 0.5
    clock.mark(cpu)
    assert clock.total() == 4.0
