"""Runs: composed configs, a few optimizer steps on real Fashion-MNIST, no network."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import ROOT
from train import train


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def test_guided_and_baseline_runs(tiny_cfg):
    g_cfg = tiny_cfg(name="guided")
    b_cfg = tiny_cfg(["guidance=none"], name="baseline")
    g, b = train(g_cfg), train(b_cfg)
    gm, bm = metrics(Path(g_cfg.paths.output_dir)), metrics(Path(b_cfg.paths.output_dir))
    for m in (gm, bm):
        assert m["val/acc"].notna().any() and m["train/task_loss"].notna().sum() == 4
        assert m["val/step"].max() == 4  # validated at the final step
        assert m["val/attn_div"].notna().any()
    assert "train/guidance_loss" in gm.columns and gm["train/guidance_loss"].notna().sum() == 4
    assert "train/guidance_loss" not in bm.columns
    assert (gm["train/guidance_loss"].dropna() > 0).all()
    for cfg in (g_cfg, b_cfg):
        out = Path(cfg.paths.output_dir)
        assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "config.yaml").is_file()
    assert 0.0 <= g["val/acc"] <= 1.0


def test_weight_zero_reproduces_the_baseline_exactly(tiny_cfg):
    zero = tiny_cfg(["guidance.weight=0"], name="zero")
    base = tiny_cfg(["guidance=none"], name="base")
    train(zero), train(base)
    a = metrics(Path(zero.paths.output_dir))["train/task_loss"].dropna().to_numpy()
    b = metrics(Path(base.paths.output_dir))["train/task_loss"].dropna().to_numpy()
    assert len(a) == 4 and (a == b).all()


def test_guidance_changes_training(tiny_cfg):
    g = tiny_cfg(["guidance.weight=1"], name="g")
    b = tiny_cfg(["guidance=none"], name="b")
    train(g), train(b)
    a = metrics(Path(g.paths.output_dir))["train/task_loss"].dropna().to_numpy()
    c = metrics(Path(b.paths.output_dir))["train/task_loss"].dropna().to_numpy()
    assert a[0] == c[0]  # same init and first batch
    assert (a[1:] != c[1:]).any()  # the guidance gradient changed the weights


def test_resume_from_checkpoint(tiny_cfg):
    first = tiny_cfg(name="first")
    train(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4 and state["hyper_parameters"]["config"]["seed"] == 0
    resumed = tiny_cfg([f"ckpt_path={ckpt}", "trainer.max_steps=6"], name="resumed")
    train(resumed)
    m = metrics(Path(resumed.paths.output_dir))
    assert m["val/step"].max() == 6 and m["train/task_loss"].notna().sum() == 2
    out = Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(out, map_location="cpu", weights_only=False)["global_step"] == 6


def test_control_targets_run(tiny_cfg):
    for kind in ("shuffled", "gradient", "uniform"):
        cfg = tiny_cfg([f"guidance.target.kind={kind}", "trainer.max_steps=2"], name=kind)
        train(cfg)
        assert metrics(Path(cfg.paths.output_dir))["train/guidance_loss"].notna().sum() == 2


def test_misspelt_override_is_an_error(tiny_cfg):
    from hydra.errors import ConfigCompositionException as HydraCompositionError

    with pytest.raises(HydraCompositionError):
        tiny_cfg(["guidance.wieght=0.3"])


def test_train_py_command_line_with_wandb_offline(tmp_path):
    from tests.conftest import TINY

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    overrides = [o for o in TINY if not o.startswith("logger")] + ["trainer.max_steps=2"]
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = metrics(out)
    assert m["val/acc"].notna().any() and "train/guidance_loss" in m.columns
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    assert (out / ".hydra" / "config.yaml").is_file()


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
    cfg = tiny_cfg(["knn.enabled=false"], name="slow")
    train(cfg)
    m = metrics(Path(cfg.paths.output_dir))
    assert m["train/elapsed_s"].max() >= 4 * 0.2
