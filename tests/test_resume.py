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
import yaml

import siftguide.train as train_py
from siftguide.module import warmup_cosine
from siftguide.analysis.loading import UnreadableCheckpointError
from siftguide.changes import ResumeRefused
from siftguide.resume import WANDB_ID_FILE, resolve_ckpt_path
from siftguide.sampler import ResumableSampler
from tests.conftest import ROOT, TINY
from siftguide.train import train

# 3 batches per epoch: 7 steps cross two epoch boundaries; validation (and a checkpoint) every 2 steps
SHORT = ["data.train_subset=96", "trainer.max_steps=7", "trainer.val_check_interval=2", "callbacks.knn=null",
         "module.warmup_steps=2", "trainer.log_every_n_steps=1"]
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
            "callbacks.knn=null", "module.align_batches=0", "trainer.log_every_n_steps=1"]
    _, run = _kill_and_resume(tiny_cfg, monkeypatch, fast, k=3, ckpt_step=2)
    b = _rows(run)
    assert b["val/acc"].notna().sum() == 3 and b["train/loss"].notna().sum() == 5


@pytest.mark.slow
def test_killed_run_resumes_exactly_with_wandb_and_generators(tiny_cfg, monkeypatch):
    """Longer, more epochs, token dropping and the shuffled control (their own generators), the kNN probe, and
    wandb: the resumed run continues the wandb run id kept in the run directory."""
    overrides = [*SHORT, "logger=default", "guidance=[attention,token_drop]", "relevance.kind=shuffled",
                 "callbacks.knn.k=20", "callbacks.knn.bank_size=64", "callbacks.knn.query_size=64"]
    _, run = _kill_and_resume(tiny_cfg, monkeypatch, overrides, k=5, ckpt_step=4)
    run_id = (run / WANDB_ID_FILE).read_text()
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(run_id) for s in segments)


def test_resuming_a_finished_run_with_more_steps_follows_the_new_schedule(tiny_cfg):
    """The LR after resuming is the new schedule's at the resumed step (the optimizer saved the old one), and the
    logged steps continue at the checkpoint's step (Lightning's end-of-fit checkpoint advanced them by one)."""
    cheap = ["callbacks.knn=null", "module.align_batches=0", "data.val_size=64"]
    first = tiny_cfg(["trainer.max_steps=4", *cheap], name="ext")
    train(first)
    train(tiny_cfg(["trainer.max_steps=6", *cheap, "ckpt_path=last"], name="ext"))
    m = pd.read_csv(Path(first.paths.output_dir) / "metrics.csv")
    lr = m.dropna(subset=["train/lr"])
    assert lr["step"].tolist() == [0, 1, 2, 3, 4, 5]
    sched = warmup_cosine(1, 6, 0.01)  # TINY: module.warmup_steps=1; min_lr_factor 0.01; optimizer.lr 1e-3
    assert lr["train/lr"].iloc[4:].tolist() == pytest.approx([1e-3 * sched(4), 1e-3 * sched(5)], rel=1e-6)


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
    args = [*tiny, "data.train_subset=96", "trainer.max_steps=30", "trainer.val_check_interval=3", "callbacks.knn=null",
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


# ------------------------------------------------------------------------------------------ resume with changes
CHEAP = ["callbacks.knn=null", "module.align_batches=0", "data.val_size=64"]


def _keep_trainer(monkeypatch, trainers: list):
    build = train_py.build

    def keep(cfg, ckpt=None):
        module, data, trainer = build(cfg, ckpt)
        trainers.append(trainer)
        return module, data, trainer

    monkeypatch.setattr(train_py, "build", keep)


def test_settings_changed_on_resume_act_from_the_resumed_step_and_are_recorded(tiny_cfg, monkeypatch):
    """optimizer.lr, weight decay and the guidance weight changed when resuming a step-4 checkpoint: steps 4 and 5
    run with the new values (the restored optimizer and scheduler would keep the saved ones), config_history.yaml
    and config.yaml say from which step."""
    first = tiny_cfg(["trainer.max_steps=4", *CHEAP], name="lr")
    train(first)
    trainers = []
    with monkeypatch.context() as m:
        _keep_trainer(m, trainers)
        train(tiny_cfg(["trainer.max_steps=6", *CHEAP, "ckpt_path=last", "optimizer.lr=5e-3",
                        "optimizer.weight_decay=0.1", "guidance.weight=2"], name="lr"))
    run = Path(first.paths.output_dir)
    m = pd.read_csv(run / "metrics.csv").dropna(subset=["train/lr"])
    assert m["step"].tolist() == [0, 1, 2, 3, 4, 5]
    before, after = warmup_cosine(1, 4, 0.01), warmup_cosine(1, 6, 0.01)  # TINY: warmup 1; min_lr_factor 0.01
    assert m["train/lr"].tolist() == pytest.approx([1e-3 * before(s) for s in range(4)]
                                                   + [5e-3 * after(s) for s in (4, 5)], rel=1e-6)
    assert m["train/guidance_weight"].tolist() == [1.0] * 4 + [2.0] * 2
    decay, no_decay = trainers[0].optimizers[0].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["initial_lr"] == 5e-3
    history = yaml.safe_load((run / "config_history.yaml").read_text())
    assert [(e["event"], e["step"]) for e in history] == [("start", 0), ("resume", 4)]
    assert history[1]["changed"] == {"guidance.attention.schedule.total_steps": {"before": 4, "after": 6},
                                     "guidance.weight": {"before": 1.0, "after": 2.0},
                                     "optimizer.lr": {"before": 0.001, "after": 0.005},
                                     "optimizer.weight_decay": {"before": 0.05, "after": 0.1},
                                     "trainer.max_steps": {"before": 4, "after": 6}}
    text = (run / "config.yaml").read_text()
    assert "#   from step 4: optimizer.lr: 0.001 -> 0.005" in text and yaml.safe_load(text)["optimizer"]["lr"] == 5e-3


def test_a_changed_model_is_refused_and_a_new_run_from_the_weights_is_the_way(tiny_cfg, monkeypatch):
    first = tiny_cfg(["trainer.max_steps=2", *CHEAP], name="m")
    train(first)
    run = Path(first.paths.output_dir)
    written = {p: p.read_text() for p in (run / "config.yaml", run / "config_history.yaml", run / "metrics.csv")}
    for change, match in ((["model.depth=3"], "model.depth: 2 -> 3"), (["seed=1"], "seed: 0 -> 1"),
                          (["objective=mae"], "objective._target_: siftguide.objectives.SupervisedObjective"),
                          (["trainer.max_steps=1"], "trainer.max_steps=1 is below the checkpoint's step 2")):
        with pytest.raises(ResumeRefused, match=match) as e:
            train(tiny_cfg(["trainer.max_steps=2", *CHEAP, "ckpt_path=last", *change], name="m"))
        assert "resume.new_run=true" in str(e.value)
        assert {p: p.read_text() for p in written} == written  # refused before anything was written
    with pytest.raises(ValueError, match="its own run directory"):  # a new run does not overwrite the old one
        train(tiny_cfg([*CHEAP, "ckpt_path=last", "seed=1", "resume.new_run=true"], name="m"))
    # a new run from the weights: another seed and model depth, step 0, the checkpoint's weights where they fit
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    trainers = []
    with monkeypatch.context() as m:
        _keep_trainer(m, trainers)
        new = tiny_cfg(["trainer.max_steps=1", *CHEAP, f"ckpt_path={run}", "resume.new_run=true", "seed=1",
                        "model.depth=3", "optimizer.lr=0"], name="new")
        train(new)
    weights = trainers[0].lightning_module.state_dict()
    assert torch.equal(weights["net.blocks.1.attn.qkv.weight"], saved["net.blocks.1.attn.qkv.weight"])  # lr=0
    assert "net.blocks.2.attn.qkv.weight" not in saved  # the new block keeps its initialisation
    out = Path(new.paths.output_dir)
    assert pd.read_csv(out / "metrics.csv").dropna(subset=["train/loss"])["step"].tolist() == [0]
    (entry,) = yaml.safe_load((out / "config_history.yaml").read_text())
    assert entry["event"] == "new_run" and entry["step"] == 0 and entry["changed"]["seed"] == {"before": 0, "after": 1}


def test_a_torn_last_checkpoint_falls_back_to_the_previous_one(tiny_cfg, caplog):
    first = tiny_cfg(["trainer.max_steps=4", "trainer.val_check_interval=2", *CHEAP], name="torn")
    train(first)
    ckpts = Path(first.paths.output_dir) / "checkpoints"
    assert torch.load(ckpts / "last.prev.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    size = (ckpts / "last.ckpt").stat().st_size
    os.truncate(ckpts / "last.ckpt", size // 2)  # `truncate -s`: a copy cut short, a full disk
    with caplog.at_level("WARNING", logger="siftguide.resume"):
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
    from siftguide.analysis.loading import UntrustedCheckpointError, load_checkpoint

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
