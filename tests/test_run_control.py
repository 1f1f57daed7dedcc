"""Run control: a non-finite loss stops and fails the run, the step progress bar, the compile switch and the
console script."""
import json
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from siftguide.callbacks import NonFiniteCheck, NonFiniteLossError
from siftguide.train import build_module, train


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


def test_step_progress_bar_and_no_third_party_warnings(tiny_cfg, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", append=True)  # whatever train.py does not filter is recorded
        train(tiny_cfg(["trainer.enable_progress_bar=true", "callbacks.knn=null", "trainer.log_every_n_steps=50"],
                       name="bar"))
    out = capsys.readouterr().out
    assert "Steps" in out and "4/4" in out and "Epoch" not in out
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "exists and is not empty" in m or "LeafSpec" in m], messages
    assert any("smaller than the logging interval" in m for m in messages)  # the user's own setting: kept


def test_compile_switch_compiles_the_blocks(tiny_cfg, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    build_module(tiny_cfg(["compile=true"]))
    assert compiled == ["Block", "Block"]  # TINY: 2 blocks
    compiled.clear()
    build_module(tiny_cfg())
    assert compiled == []


def test_siftguide_train_console_script(monkeypatch, capsys, tmp_path):
    """siftguide-train is the package's entry point (siftguide.train:main), with the configs inside the package:
    it runs from any directory, no checkout needed (the non-editable install: tests/test_install.py)."""
    import tomllib

    import siftguide.train
    from tests.conftest import ROOT

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["siftguide-train"] == "siftguide.train:main"
    monkeypatch.chdir(tmp_path)  # any directory
    monkeypatch.setattr("sys.argv", ["siftguide-train", "--cfg", "job", "trainer.max_steps=7", "compile=true"])
    siftguide.train.main()  # --cfg job: print the composed config, do not train
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "compile: true" in out and "callbacks:" in out


def test_root_train_py_is_a_wrapper_of_the_package_entry_point():
    from tests.conftest import ROOT

    code = [line for line in (ROOT / "train.py").read_text().splitlines() if line and not line.startswith('"""')]
    assert code == ["from siftguide.train import main", 'if __name__ == "__main__":', "    main()"]


@pytest.mark.slow
def test_compiled_run_matches_eager(tiny_cfg):
    """compile=true: the blocks run compiled (one-off compile of minutes on a small CPU) with the guidance capture
    inside them, and the losses of the first steps match the eager run's."""
    import pandas as pd

    losses = []
    for name, extra in (("eager", []), ("compiled", ["compile=true"])):
        cfg = tiny_cfg(["trainer.max_steps=2", "callbacks.knn=null", *extra], name=name)
        train(cfg)
        m = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
        losses.append(m[["train/task_loss", "train/guidance_loss"]].dropna().to_numpy())
    assert losses[0].shape == (2, 2)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)


def test_guidance_balance_warns_once_for_a_whole_dominated_window(caplog):
    from siftguide.callbacks.balance import GuidanceBalance

    def step(cb, k, task, term, every=4):
        module = SimpleNamespace(last_terms=(torch.tensor(task), {"attention_loss": torch.tensor(term)}),
                                 guidance=SimpleNamespace(weight=1000.0))
        trainer = SimpleNamespace(global_step=k, log_every_n_steps=every, is_global_zero=True)
        cb.on_train_batch_end(trainer, module, None, None, k - 1)
        assert module.last_terms is None  # consumed: no reference kept to the step's tensors

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
