"""siftguide.relevance.stage: the relevance stage picks the map (SIFT or a control) for a batch: the controls keep
shape and normalisation and use the wrong map, fallbacks to uniform are counted, blank images train without NaN."""
import numpy as np
import torch

from siftguide.guidance import select_tokens
from siftguide.relevance import RelevanceSource, RelevanceTarget, foreground_relevance, roll_relevance, shuffle_relevance
from siftguide.train import train
from tests.conftest import blob_image
from tests.helpers import folder_cfg, image_folder, run_metrics


def test_controls_keep_shape_and_normalisation():
    imgs = torch.stack([blob_image(32, center=(c, c))[0] for c in (6.0, 14.0, 22.0, 26.0)])
    sift = RelevanceTarget("sift")(imgs, 8)
    shuffled = RelevanceTarget("shuffled")(imgs, 8)
    uniform = RelevanceTarget("uniform")(imgs, 8)
    grad = RelevanceTarget("gradient")(imgs, 8)
    for r in (sift, shuffled, uniform, grad):
        assert r.shape == (4, 4, 4)
        torch.testing.assert_close(r.flatten(1).sum(1), torch.ones(4))
    # shuffled is a derangement of the batch's SIFT maps
    perm = [int(((sift - shuffled[i]).abs().flatten(1).sum(1) < 1e-6).nonzero()[0]) for i in range(4)]
    assert sorted(perm) == [0, 1, 2, 3] and all(p != i for i, p in enumerate(perm))
    assert torch.equal(shuffle_relevance(sift[:1]), sift[:1])
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 16))
    assert grad[0].flatten().argmax() != grad[3].flatten().argmax()


def test_controls_use_the_wrong_map():
    img = torch.cat([blob_image(32, center=(4.0, 4.0)), blob_image(32, center=(27.0, 27.0))])
    own = RelevanceSource("sift")(img, 8)
    rolled = RelevanceSource("rolled")(img, 8)
    assert not torch.equal(rolled, own) and torch.equal(rolled, roll_relevance(own))
    torch.testing.assert_close(rolled.flatten(1).sort(1).values, own.flatten(1).sort(1).values)  # same values
    shuffled = RelevanceSource("shuffled")(img, 8)
    assert torch.equal(shuffled, own.roll(1, 0))  # B = 2: the other image's map
    fg = foreground_relevance(img, 8)
    assert fg[0].argmax() == 0 and fg[1].argmax() == 15  # the blob's patch
    src = RelevanceSource("mean", mean_images=4)

    class DM:  # a datamodule with in-memory training images
        class train_set:
            images = (img * 255).to(torch.uint8)

    from siftguide.data import DeviceTransform

    src.setup(DM, DeviceTransform(32, crop_scale=None, hflip=False), 8)
    mean = src(img, 8)
    assert torch.equal(mean[0], mean[1])  # the same map for every image
    torch.testing.assert_close(mean[0], own.mean(0), atol=2e-3, rtol=0)


def test_random_control_drops_at_random():
    src = RelevanceSource("random", seed=0)
    imgs = torch.rand(8, 1, 32, 32)
    a, b = src(imgs, 8), src(imgs, 8)
    assert not torch.equal(a, b)  # fresh noise every batch
    ids = select_tokens(a, 4)
    assert len({tuple(r.tolist()) for r in ids}) > 1  # different images keep different patches


def test_fallbacks_are_counted():
    imgs = torch.cat([blob_image(32, center=(16.0, 16.0)), torch.full((3, 1, 32, 32), 0.5)])
    target = RelevanceTarget("sift")
    target(imgs, 8)
    assert float(target.last_fallback) == 0.75  # 3 of 4 images have no keypoint


def test_blank_images_train_without_nan(tiny_cfg, tmp_path):
    """No keypoints anywhere: the relevance falls back to uniform, guided losses stay finite."""
    cfg = folder_cfg(tiny_cfg, image_folder(tmp_path / "imgs", blank=True), ["guidance=[attention,interrelation]"])
    train(cfg)
    m = run_metrics(cfg)
    assert (m["train/no_keypoint_frac"].dropna() == 1).all() and m["train/no_keypoint_frac"].notna().sum() == 3
    for k in ("train/loss", "train/guidance_loss", "val/loss"):
        assert np.isfinite(m[k].dropna()).all() and m[k].notna().any(), k
