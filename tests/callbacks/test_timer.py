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


def test_cost_clock_counts_cpu_work_not_waiting():
    import time as _time

    from siftguide.callbacks import CostClock

    clock, cpu = CostClock(), torch.device("cpu")
    clock.start(cpu)
    _time.sleep(0.3)
    clock.mark(cpu)
    assert clock.total() < 0.1
    t0 = _time.thread_time()
    while _time.thread_time() - t0 < 0.3:  # busy: 0.3 s of this thread's CPU, however long that takes here
        pass
    clock.mark(cpu)
    assert 0.3 <= clock.total() < 1.0
