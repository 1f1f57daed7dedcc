"""siftguide.callbacks.nonfinite: a non-finite loss stops and fails the run, read from the device only at the
logging interval, without a NaN checkpoint."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from siftguide.callbacks import NonFiniteCheck, NonFiniteLossError
from siftguide.train import train


def _fake_trainer(step: int, every: int = 5):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=10.0)
    return SimpleNamespace(global_step=step, log_every_n_steps=every, optimizers=[opt], precision="bf16-mixed")


def test_non_finite_check_reads_the_device_flag_only_at_the_interval():
    cb, module = NonFiniteCheck(), SimpleNamespace(guidance=SimpleNamespace(weight=3.0))
    losses = [1.0, 2.0, float("nan"), 1.0, float("inf"), 1.0]
    for step, v in enumerate(losses[:4], start=1):  # steps 1..4: no check yet, whatever the loss
        cb.on_train_batch_end(_fake_trainer(step), module, {"loss": torch.tensor(v)}, None, step - 1)
    assert int(cb._first) == 2  # the first bad batch (metrics.csv step 2), recorded on the device
    with pytest.raises(NonFiniteLossError) as err:  # step 5 = log_every_n_steps: checked
        cb.on_train_batch_end(_fake_trainer(5), module, {"loss": torch.tensor(losses[4])}, None, 4)
    msg = str(err.value)
    assert "at step 2" in msg and "optimizer.lr=10" in msg and "guidance.weight=3" in msg and "bf16-mixed" in msg
    ok = NonFiniteCheck()
    for step in range(1, 11):
        ok.on_train_batch_end(_fake_trainer(step), module, {"loss": torch.tensor(0.5)}, None, step - 1)
    ok.on_save_checkpoint(_fake_trainer(10), module, {})  # finite: no error


def test_diverging_run_stops_failed_without_a_nan_checkpoint(tiny_cfg):
    cfg = tiny_cfg(["optimizer.lr=1e4", "trainer.max_steps=12", "trainer.val_check_interval=6",
                    "trainer.log_every_n_steps=4", "callbacks.knn=null"], name="nan")
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite at step \d+.*learning rate too high"):
        train(cfg)
    run = Path(cfg.paths.output_dir)
    result = json.loads((run / "results.json").read_text())
    assert result["status"] == "failed" and "NonFiniteLossError" in result["error"] and result["global_step"] < 12
    ckpt = run / "checkpoints" / "last.ckpt"
    if ckpt.exists():  # only a checkpoint from before the first non-finite step
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
