"""siftguide.callbacks.balance: a guidance loss drowning the task loss is warned once per dominated window."""
import logging
from types import SimpleNamespace

import torch

from siftguide.train import train


def test_guidance_balance_warns_once_for_a_whole_dominated_window(caplog):
    from siftguide.callbacks.balance import GuidanceBalance

    def step(cb, k, task, term, every=4):
        module = SimpleNamespace(guidance=SimpleNamespace(weight=1000.0))
        outputs = {"loss": torch.tensor(task + term), "task_loss": torch.tensor(task),
                   "guidance_terms": {"attention_loss": torch.tensor(term)}}
        trainer = SimpleNamespace(global_step=k, log_every_n_steps=every, is_global_zero=True)
        cb.on_train_batch_end(trainer, module, outputs, None, k - 1)

    cb = GuidanceBalance()
    with caplog.at_level(logging.WARNING, logger="siftguide.train"):
        for k, term in enumerate([600.0, 600.0, 50.0, 600.0], start=1):  # one step of the window at 50x: no warning
            step(cb, k, 1.0, term)
        assert not caplog.records and not cb.warned
        for k in range(5, 13):  # two windows at >= 602x (the smallest ratio of the first): one warning
            step(cb, k, 2.0, 1200.0 + k)
    (record,) = caplog.records
    assert "attention_loss >= 602x the task loss at every step of the 4 steps up to step 8" in record.getMessage()
    assert "guidance.weight (now 1000.0)" in record.getMessage()


def test_a_guidance_loss_drowning_the_task_is_warned_in_a_run(tiny_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="siftguide.train"):
        train(tiny_cfg(["guidance.weight=1e5", "callbacks.knn=null", "trainer.log_every_n_steps=2"], name="heavy"))
    assert sum("guidance dominates the task loss: attention_loss" in r.getMessage() for r in caplog.records) == 1
