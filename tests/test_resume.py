"""Exact resume: a run killed at step k and resumed in its run directory ends as the uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

import train as train_py
from siftguide.module import warmup_cosine
from siftguide.resume import WANDB_ID_FILE, resolve_ckpt_path
from siftguide.sampler import ResumableSampler
from tests.conftest import ROOT, TINY
from train import train

# 3 batches per epoch: 7 steps cross two epoch boundaries; validation (and a checkpoint) every 2 steps
SHORT = ["data.train_subset=96", "trainer.max_steps=7", "trainer.val_check_interval=2", "knn.enabled=false",
         "scheduler.warmup_steps=2", "trainer.log_every_n_steps=1"]
COMPARED = ["step", "train/lr", "train/loss", "train/task_loss", "val/acc", "val/loss"]


class _Kill(L.Callback):
    """Stands in for a killed process: the run dies after optimizer step ``k`` (mid-epoch, between checkpoints)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.k:
            raise RuntimeError("killed")


def _killed_at(monkeypatch, k: int):
    build = train_py.build

    def with_kill(cfg, ckpt=None):
        module, data, trainer = build(cfg, ckpt)
        trainer.callbacks.append(_Kill(k))
        return module, data, trainer

    monkeypatch.setattr(train_py, "build", with_kill)


def _rows(run_dir: Path) -> pd.DataFrame:
    m = pd.read_csv(run_dir / "metrics.csv")
    return m[[c for c in COMPARED if c in m.columns]]


def _kill_and_resume(tiny_cfg, monkeypatch, overrides: list[str], k: int, ckpt_step: int) -> tuple[Path, Path]:
    """An uninterrupted run and the same run killed after step ``k`` then resumed in its run directory with the
    user's command (the same overrides plus ``ckpt_path=last``); their run directories."""
    full = tiny_cfg(overrides, name="full")
    train(full)
    killed = tiny_cfg(overrides, name="killed")
    with monkeypatch.context() as m:
        _killed_at(m, k)
        with pytest.raises(RuntimeError, match="killed"):
            train(killed)
    run = Path(killed.paths.output_dir)
    assert '"status": "failed"' in (run / "results.json").read_text()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == ckpt_step
    train(tiny_cfg([*overrides, "ckpt_path=last"], name="killed"))
    assert '"status": "finished"' in (run / "results.json").read_text()
    a, b = _rows(Path(full.paths.output_dir)), _rows(run)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)  # the same rows: none duplicated, none lost
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)
    return Path(full.paths.output_dir), run


def test_killed_run_resumes_exactly(tiny_cfg, monkeypatch):
    """2 batches per epoch, a checkpoint every 2 steps: killed at step 3 (mid-epoch, past the checkpoint of step
    2), the resumed run logs exactly the uninterrupted run's rows (LR, losses, validation, across an epoch)."""
    fast = ["data.train_subset=64", "data.val_size=64", "trainer.max_steps=5", "trainer.val_check_interval=2",
            "knn.enabled=false", "align_batches=0", "trainer.log_every_n_steps=1"]
    _, run = _kill_and_resume(tiny_cfg, monkeypatch, fast, k=3, ckpt_step=2)
    b = _rows(run)
    assert b["val/acc"].notna().sum() == 3 and b["train/loss"].notna().sum() == 5


@pytest.mark.slow
def test_killed_run_resumes_exactly_with_wandb_and_generators(tiny_cfg, monkeypatch):
    """Longer, more epochs, token dropping and the shuffled control (their own generators), the kNN probe, and
    wandb: the resumed run continues the wandb run id kept in the run directory."""
    overrides = [*SHORT, "logger=default", "guidance=[attention,token_drop]", "relevance.kind=shuffled",
                 "knn.enabled=true", "knn.bank_size=64", "knn.query_size=64"]
    _, run = _kill_and_resume(tiny_cfg, monkeypatch, overrides, k=5, ckpt_step=4)
    run_id = (run / WANDB_ID_FILE).read_text()
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(run_id) for s in segments)


def test_resuming_a_finished_run_with_more_steps_follows_the_new_schedule(tiny_cfg):
    """The LR after resuming is the new schedule's at the resumed step (the optimizer saved the old one), and the
    logged steps continue at the checkpoint's step (Lightning's end-of-fit checkpoint advanced them by one)."""
    cheap = ["knn.enabled=false", "align_batches=0", "data.val_size=64"]
    first = tiny_cfg(["trainer.max_steps=4", *cheap], name="ext")
    train(first)
    train(tiny_cfg(["trainer.max_steps=6", *cheap, "ckpt_path=last"], name="ext"))
    m = pd.read_csv(Path(first.paths.output_dir) / "metrics.csv")
    lr = m.dropna(subset=["train/lr"])
    assert lr["step"].tolist() == [0, 1, 2, 3, 4, 5]
    sched = warmup_cosine(1, 6, 0.01)  # TINY: scheduler.warmup_steps=1; min_lr_factor 0.01; optimizer.lr 1e-3
    assert lr["train/lr"].iloc[4:].tolist() == pytest.approx([1e-3 * sched(4), 1e-3 * sched(5)], rel=1e-6)


def test_ckpt_path_forms(tmp_path):
    run = tmp_path / "run"
    assert resolve_ckpt_path(None, run) is None
    assert resolve_ckpt_path("last", run) is None  # nothing to resume yet: a fresh run (auto-resume switch)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("last", run) == run / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(str(run), tmp_path / "other") == run / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="hydra.run.dir=<run dir> ckpt_path=last"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), run)


def test_sampler_resumes_mid_epoch_and_draws_no_global_random_numbers():
    data = list(range(50))
    pos = {"b": 0}
    s = ResumableSampler(data, batch_size=8, seed=3, position=lambda: pos["b"])
    assert s.batches_per_epoch == 6
    state = torch.get_rng_state()
    e0, e1 = s.permutation(0), s.permutation(1)
    assert sorted(e0) == data and e0 != e1 and e0 != data
    assert list(iter(s)) == e0
    pos["b"] = 6 + 2  # two batches into epoch 1
    assert list(iter(s)) == e1[16:] and s.epoch == 1
    assert torch.equal(torch.get_rng_state(), state)
    assert ResumableSampler(data, 8, seed=4).permutation(0) != e0  # the run's seed changes the order
    ranks = [ResumableSampler(data, 4, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    assert sorted(ranks[0].permutation(0) + ranks[1].permutation(0)) == data  # 25 each, disjoint, complete
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableSampler(data[:3], batch_size=8)


@pytest.mark.slow
def test_sigkilled_train_py_resumes_exactly(tmp_path):
    """The real thing: `python train.py` killed with SIGKILL at whatever step it reached, then the same command
    with `hydra.run.dir=<run dir> ckpt_path=last`."""
    tiny = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval", "logger"))]
    args = [*tiny, "data.train_subset=96", "trainer.max_steps=30", "trainer.val_check_interval=3", "knn.enabled=false",
            "logger=csv"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'full'}"], cwd=ROOT, env=env, check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={run}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and ckpt.stat().st_size > 0:
            time.sleep(1.0)  # a few more steps past the checkpoint, then kill
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([*cmd, f"hydra.run.dir={run}", "ckpt_path=last"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    a, b = _rows(tmp_path / "full"), _rows(run)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


def test_config_changes_name_what_differs():
    from siftguide.resume import config_changes

    saved = {"seed": 0, "optimizer": {"lr": 1e-3}, "paths": {"output_dir": "a"}, "logger": {"csv": {"save_dir": "a"}}}
    now = {"seed": 0, "optimizer": {"lr": 3e-4}, "paths": {"output_dir": "b"}, "logger": {"csv": {"save_dir": "b"}},
           "compile": True}
    assert config_changes(saved, now) == ["compile: <absent> -> True", "optimizer.lr: 0.001 -> 0.0003"]
