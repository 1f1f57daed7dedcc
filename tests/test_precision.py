"""Mixed precision: SIFT relevance and the guidance divergences stay fp32 under bf16 autocast; a bf16-mixed run
with guidance trains with finite losses."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from siftguide.guidance import AttentionLoss, PatchInterrelation, AttentionAlignment
from siftguide.precision import fp32_region
from siftguide.relevance import RelevanceStage
from siftguide.train import train
from tests.conftest import blob_image

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _images() -> torch.Tensor:
    return torch.cat([blob_image(32, (10.0, 20.0)), blob_image(32, (22.0, 8.0), sigma=2.0)])


def test_fp32_region_switches_autocast_off_inside_only():
    a = torch.randn(4, 4)
    with torch.autocast(**BF16):
        assert (a @ a).dtype == torch.bfloat16
        with fp32_region():
            assert (a @ a).dtype == torch.float32
        assert (a @ a).dtype == torch.bfloat16
    with fp32_region():  # no autocast: nothing to switch off
        assert (a @ a).dtype == torch.float32


@pytest.mark.parametrize("kind, mode, smoothing", [("sift", "count", 1.0), ("sift", "gaussian", 0.0),
                                                   ("gradient", "count", 1.0), ("foreground", "count", 0.0)])
def test_relevance_is_fp32_under_bf16_autocast(kind, mode, smoothing):
    src = RelevanceStage(kind=kind, mode=mode, smoothing=smoothing, sift=dict(max_keypoints=16))
    x = _images()
    ref = src(x, 8)[0]
    with torch.autocast(**BF16):
        rel = src(x, 8)[0]
    assert rel.dtype == torch.float32
    torch.testing.assert_close(rel, ref)  # the very fp32 values, not a bf16 rounding of them
    torch.testing.assert_close(rel.flatten(1).sum(1), torch.ones(2))


class _MatmulMode(AttentionLoss):
    """A loss mode whose value uses a matmul (autocast's first bf16 candidate), as a future mode might."""

    def value(self, relevance, ids_keep=None):
        a = self.patch_attention("cls")[max(self.layers)]  # (B, P)
        return (a.unsqueeze(1) @ relevance.flatten(1).float().unsqueeze(2)).mean()


def test_guidance_divergences_are_fp32_under_bf16_autocast(tiny_vit):
    net = tiny_vit(seed=None, embed_dim=64, num_classes=10)
    x = _images()
    rel = RelevanceStage(sift=dict(max_keypoints=16))(x, 8)[0]
    for mode in (AttentionAlignment(net), PatchInterrelation(net, layers=[0]), _MatmulMode(net)):
        with torch.autocast(**BF16):
            with mode.capture():
                net(x)
            loss = mode.loss(rel, 0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), type(mode).__name__
    monitor = AttentionAlignment(net, weight=0.0)
    with torch.autocast(**BF16):
        with monitor.capture(force=True):
            net(x)
        assert monitor.divergence_value(rel).dtype == torch.float32


def test_bf16_mixed_guided_run_has_finite_losses(tiny_cfg):
    cfg = tiny_cfg(["trainer.precision=bf16-mixed", "guidance=[attention,interrelation]", "relevance.mode=gaussian",
                    "relevance.smoothing=0.5", "trainer.max_steps=3", "callbacks.knn=null"], name="bf16")
    final = train(cfg)
    m = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
    for name in ("train/loss", "train/task_loss", "train/guidance/attention_loss", "train/guidance/interrelation_loss"):
        v = m[name].dropna()
        assert len(v) == 3 and v.map(math.isfinite).all() and (v > 0).all(), name
    assert math.isfinite(final["val/loss"]) and math.isfinite(final["val/attn_div"])
