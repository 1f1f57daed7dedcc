"""siftguide.run.changes: settings changed on resume act from the resumed step and are recorded; a changed model is
refused, and a new run from the weights is the way."""
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from siftguide.run.changes import ResumeRefused
from siftguide.guidance.schedule import warmup_cosine
from siftguide.train import train
from tests.helpers import CHEAP, keep_trainer


def test_settings_changed_on_resume_act_from_the_resumed_step_and_are_recorded(tiny_cfg, monkeypatch):
    """optimizer.lr, weight decay and the guidance weight changed when resuming a step-4 checkpoint: steps 4 and 5
    run with the new values (the restored optimizer and scheduler would keep the saved ones), config_history.yaml
    and config.yaml say from which step."""
    first = tiny_cfg(["trainer.max_steps=4", *CHEAP], name="lr")
    train(first)
    trainers = []
    with monkeypatch.context() as m:
        keep_trainer(m, trainers)
        train(tiny_cfg(["trainer.max_steps=6", *CHEAP, "ckpt_path=last", "optimizer.lr=5e-3",
                        "optimizer.weight_decay=0.1", "guidance.weight=2"], name="lr"))
    run = Path(first.paths.output_dir)
    m = pd.read_csv(run / "metrics.csv").dropna(subset=["train/lr/decay"])
    assert m["step"].tolist() == [0, 1, 2, 3, 4, 5]
    before, after = warmup_cosine(1, 4, 0.01), warmup_cosine(1, 6, 0.01)  # TINY: warmup 1; min_lr_factor 0.01
    assert m["train/lr/decay"].tolist() == pytest.approx([1e-3 * before(s) for s in range(4)]
                                                   + [5e-3 * after(s) for s in (4, 5)], rel=1e-6)
    w = pd.read_csv(run / "metrics.csv").dropna(subset=["train/guidance/attention_weight"])
    assert w["train/guidance/attention_weight"].tolist() == [1.0] * 4 + [2.0] * 2
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
        keep_trainer(m, trainers)
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
