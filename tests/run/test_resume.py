"""Exact resume: a run killed at step k and resumed in its run directory ends as the uninterrupted run; the forms of
ckpt_path, a torn checkpoint, a checkpoint that would run code (``kill -9`` of ``python train.py``:
tests/e2e/test_resume.py; settings changed on resume: tests/run/test_changes.py)."""
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from siftguide.run.checkpoint import UnreadableCheckpointError
from siftguide.guidance.schedule import warmup_cosine
from siftguide.run.resume import WANDB_ID_FILE, resolve_ckpt_path
from siftguide.train import train
from tests.helpers import CHEAP, killed_at, logged_rows


# 3 batches per epoch: 7 steps cross two epoch boundaries; validation (and a checkpoint) every 2 steps
SHORT = ["data.train_subset=96", "trainer.max_steps=7", "trainer.val_check_interval=2", "callbacks.knn=null",
         "module.warmup_steps=2", "trainer.log_every_n_steps=1"]


def _kill_and_resume(tiny_cfg, monkeypatch, overrides: list[str], k: int, ckpt_step: int) -> tuple[Path, Path]:
    """An uninterrupted run and the same run killed after step ``k`` then resumed in its run directory with the
    user's command (the same overrides plus ``ckpt_path=last``); their run directories."""
    full = tiny_cfg(overrides, name="full")
    train(full)
    killed = tiny_cfg(overrides, name="killed")
    with monkeypatch.context() as m:
        killed_at(m, k)
        with pytest.raises(RuntimeError, match="killed"):
            train(killed)
    run = Path(killed.paths.output_dir)
    assert '"status": "failed"' in (run / "results.json").read_text()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == ckpt_step
    train(tiny_cfg([*overrides, "ckpt_path=last"], name="killed"))
    assert '"status": "finished"' in (run / "results.json").read_text()
    a, b = logged_rows(Path(full.paths.output_dir)), logged_rows(run)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)  # the same rows: none duplicated, none lost
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)
    return Path(full.paths.output_dir), run


def test_killed_run_resumes_exactly(tiny_cfg, monkeypatch):
    """2 batches per epoch, a checkpoint every 2 steps: killed at step 3 (mid-epoch, past the checkpoint of step
    2), the resumed run logs exactly the uninterrupted run's rows (LR, losses, validation, across an epoch)."""
    fast = ["data.train_subset=64", "data.val_size=64", "trainer.max_steps=5", "trainer.val_check_interval=2",
            "callbacks.knn=null", "callbacks.attention_divergence.batches=0", "trainer.log_every_n_steps=1"]
    _, run = _kill_and_resume(tiny_cfg, monkeypatch, fast, k=3, ckpt_step=2)
    b = logged_rows(run)
    assert b["val/acc"].notna().sum() == 3 and b["train/loss"].notna().sum() == 5


@pytest.mark.slow
def test_killed_run_resumes_exactly_with_wandb_and_generators(tiny_cfg, monkeypatch):
    """Longer, more epochs, token dropping and the shuffled control (their own generators), the kNN probe, and
    wandb: the resumed run continues the wandb run id kept in the run directory."""
    overrides = [*(o for o in SHORT if o != "callbacks.knn=null"), "logger=default",  # kNN on: its RNG draws too
                 "guidance=[attention,token_drop]", "relevance.kind=shuffled", "callbacks.knn.bank_size=64",
                 "callbacks.knn.query_size=64"]
    _, run = _kill_and_resume(tiny_cfg, monkeypatch, overrides, k=5, ckpt_step=4)
    run_id = (run / WANDB_ID_FILE).read_text()
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(run_id) for s in segments)


def test_resuming_a_finished_run_with_more_steps_follows_the_new_schedule(tiny_cfg):
    """The LR after resuming is the new schedule's at the resumed step (the optimizer saved the old one), and the
    logged steps continue at the checkpoint's step (Lightning's end-of-fit checkpoint advanced them by one)."""
    cheap = ["callbacks.knn=null", "callbacks.attention_divergence.batches=0", "data.val_size=64"]
    first = tiny_cfg(["trainer.max_steps=4", *cheap], name="ext")
    train(first)
    train(tiny_cfg(["trainer.max_steps=6", *cheap, "ckpt_path=last"], name="ext"))
    m = pd.read_csv(Path(first.paths.output_dir) / "metrics.csv")
    lr = m.dropna(subset=["train/lr/decay"])
    assert lr["step"].tolist() == [0, 1, 2, 3, 4, 5]
    sched = warmup_cosine(1, 6, 0.01)  # TINY: module.warmup_steps=1; min_lr_factor 0.01; optimizer.lr 1e-3
    assert lr["train/lr/decay"].iloc[4:].tolist() == pytest.approx([1e-3 * sched(4), 1e-3 * sched(5)], rel=1e-6)


def test_ckpt_path_forms(tmp_path):
    run = tmp_path / "run"
    assert resolve_ckpt_path(None, run) is None
    assert resolve_ckpt_path("last", run) is None  # nothing to resume yet: a fresh run (auto-resume switch)
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 3}, run / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", run) == run / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(str(run), tmp_path / "other") == run / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="hydra.run.dir=<run dir> ckpt_path=last"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), run)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")  # torn, and no previous checkpoint: an error naming it
    with pytest.raises(UnreadableCheckpointError, match=r"last.ckpt is not a PyTorch checkpoint.*no previous"):
        resolve_ckpt_path("last", run)


def test_config_changes_name_what_differs():
    from siftguide.run.resume import config_changes

    saved = {"seed": 0, "optimizer": {"lr": 1e-3}, "paths": {"output_dir": "a"}, "logger": {"csv": {"save_dir": "a"}}}
    now = {"seed": 0, "optimizer": {"lr": 3e-4}, "paths": {"output_dir": "b"}, "logger": {"csv": {"save_dir": "b"}},
           "compile": True}
    assert config_changes(saved, now) == ["compile: <absent> -> True", "optimizer.lr: 0.001 -> 0.0003"]


def test_a_torn_last_checkpoint_falls_back_to_the_previous_one(tiny_cfg, caplog):
    first = tiny_cfg(["trainer.max_steps=4", "trainer.val_check_interval=2", *CHEAP], name="torn")
    train(first)
    ckpts = Path(first.paths.output_dir) / "checkpoints"
    assert torch.load(ckpts / "last.prev.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    size = (ckpts / "last.ckpt").stat().st_size
    os.truncate(ckpts / "last.ckpt", size // 2)  # `truncate -s`: a copy cut short, a full disk
    with caplog.at_level("WARNING", logger="siftguide.run.resume"):
        train(tiny_cfg(["trainer.max_steps=6", "trainer.val_check_interval=2", *CHEAP, "ckpt_path=last"],
                       name="torn"))
    assert f"{ckpts / 'last.ckpt'} is not a PyTorch checkpoint, or is truncated or torn" in caplog.text
    assert f"Resuming from the previous checkpoint {ckpts / 'last.prev.ckpt'} (step 4)" in caplog.text
    assert (ckpts / "last.ckpt.corrupt").stat().st_size == size // 2  # kept aside, not rotated into last.prev.ckpt
    for name, step in (("last.ckpt", 6), ("last.prev.ckpt", 6)):
        assert torch.load(ckpts / name, map_location="cpu", weights_only=True)["global_step"] == step


class _WritesAFile:
    """A pickle that writes ``marker`` when it is loaded: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


def test_a_checkpoint_that_would_run_code_is_refused_without_the_trust_switch(tiny_cfg, tmp_path):
    from siftguide.run.checkpoint import UntrustedCheckpointError, load_checkpoint

    marker, evil = tmp_path / "marker", tmp_path / "evil.ckpt"
    torch.save({"global_step": 1, "state_dict": {}, "x": _WritesAFile(marker)}, evil)
    for ckpt_path in (evil, tmp_path):  # the file, and a run directory holding it as last.ckpt
        if ckpt_path == tmp_path:
            (tmp_path / "checkpoints").mkdir()
            evil.rename(tmp_path / "checkpoints" / "last.ckpt")
        with pytest.raises(UntrustedCheckpointError, match=r"evil.ckpt|last.ckpt") as e:
            train(tiny_cfg([f"ckpt_path={ckpt_path}"], name="victim"))
        assert "resume.trust_checkpoint=true" in str(e.value)
        assert not marker.exists()
    load_checkpoint(tmp_path / "checkpoints" / "last.ckpt", trust=True)  # the switch: the pickle's code runs
    assert marker.read_text() == "code ran"
