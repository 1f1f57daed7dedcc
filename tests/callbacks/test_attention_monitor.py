"""attention_monitor: off by default; when on, per-layer KL / Spearman / poor-share rows at every N-th optimizer
step in metrics.csv, equal to the analysis tool's numbers on the same images, and the net's mode restored."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from siftguide.analysis.analyze import InterrelationStats
from siftguide.analysis.monitor import AttentionMonitor
from siftguide.train import build, train


ON = ["callbacks=[default,attention_monitor]", "callbacks.attention_monitor.every_n_steps=2", "callbacks.attention_monitor.layers=[0,-1]",
      "callbacks.attention_monitor.num_images=16", "callbacks.knn=null", "guidance=none"]


def test_monitor_logs_per_layer_alignment_at_every_n_steps(tiny_cfg):
    cfg = tiny_cfg(ON, name="on")  # 4 optimizer steps, 2 blocks
    train(cfg)
    m = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
    cols = [f"monitor/{k}_l{i}" for k in ("kl", "spearman", "poor_share") for i in (0, 1)]
    assert set(cols) <= set(m.columns)
    rows = m.dropna(subset=cols, how="all")
    assert sorted(rows["step"].tolist()) == [2, 4]  # steps 2 and 4, once each
    assert rows[cols].notna().all().all()
    assert (rows[[c for c in cols if "kl" in c]] >= 0).all().all()
    assert rows[[c for c in cols if "spearman" in c]].abs().le(1).all().all()
    assert rows[[c for c in cols if "poor" in c]].apply(lambda s: s.between(0, 1)).all().all()


def test_monitor_is_off_by_default(tiny_cfg, tiny_run):
    cfg = tiny_cfg(["guidance=none"], name="off")
    assert "attention_monitor" not in cfg.callbacks  # off unless selected
    _, _, trainer = build(cfg)
    assert not any(isinstance(c, AttentionMonitor) for c in trainer.callbacks)
    m = tiny_run(["guidance=none"]).metrics()  # this config trained: the session's shared baseline run
    assert not [c for c in m.columns if c.startswith("monitor/")]


def test_monitor_values_match_the_analysis_restore_train_mode_and_send_overlays(tiny_cfg):
    from lightning.pytorch.loggers import WandbLogger

    class Recorder(WandbLogger):  # a WandbLogger that records instead of starting a wandb run
        def __init__(self):
            super().__init__(offline=True)
            self.calls = []

        def log_image(self, key, images, step=None, **kwargs):
            self.calls.append((key, images, step))

    cfg = tiny_cfg(ON + ["callbacks.attention_monitor.overlays=3"], name="direct")
    module, dm, trainer = build(cfg)
    mon = next(c for c in trainer.callbacks if isinstance(c, AttentionMonitor))
    dm.setup("fit")
    trainer.datamodule = dm  # what trainer.fit() attaches
    mon.on_fit_start(trainer, module)
    assert mon.images.shape == (16, 1, 32, 32) and mon.relevance.shape == (16, 16)
    torch.testing.assert_close(mon.relevance.sum(1), torch.ones(16))
    module.train()
    metrics, attn = mon.measure(module)
    assert module.net.training  # eval mode only for the measurement
    assert attn.shape == (16, 16)
    # the same images through the analysis tool's accumulator, by hand
    net = module.net.eval()
    stats = InterrelationStats([0, 1], 2, (4, 4), 1, 0)
    with torch.no_grad(), mon.capture.capture():
        net(module.transform.normalize(mon.images))
        stats.update(mon.capture.maps, mon.counts, mon.relevance)
    res = stats.result((1, 2))
    assert metrics["monitor/kl_l1"] == pytest.approx(float(res["kl"][1].mean()), rel=1e-5)
    assert metrics["monitor/spearman_l0"] == pytest.approx(float(res["spearman"][0].nanmean()), rel=1e-5)
    # poor share by hand: CLS attention (head mean) on 0-keypoint patches
    poor = (mon.counts == 0).float()
    assert metrics["monitor/poor_share_l1"] == pytest.approx(float((attn * poor).sum(1).mean()), rel=1e-4)
    # overlays go to wandb loggers only, as one figure of `overlays` rows
    rec = Recorder()
    mon._log_overlays([rec], attn, step=2)
    (key, images, step), = rec.calls
    assert key == "monitor/overlays" and step == 2 and len(images) == 1
    assert images[0].size[0] > 100 and images[0].size[1] > 3 * 100


def test_monitor_rejects_bad_settings():
    with pytest.raises(ValueError, match="every_n_steps"):
        AttentionMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="num_images"):
        AttentionMonitor(num_images=0)
