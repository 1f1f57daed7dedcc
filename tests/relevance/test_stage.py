"""siftguide.relevance.stage: the relevance stage picks the map (SIFT or a control) for a batch: the controls keep
shape and normalisation and use the wrong map, fallbacks are counted and returned, blank images train without NaN;
per-image maps composed with the dataset prior (prior_mix, min_keypoints), the controls composed the same way."""
import numpy as np
import pytest
import torch

from siftguide.data import DeviceTransform
from siftguide.guidance import select_tokens
from siftguide.relevance import (RelevanceStage, compose_with_prior, foreground_relevance, relevance_from_keypoints,
                                 roll_relevance, shuffle_relevance)
from siftguide.relevance.detector import detect_keypoints
from siftguide.train import train
from tests.conftest import blob_image
from tests.helpers import folder_cfg, image_folder, run_metrics


class Images:
    """A protocol dataset holding its images in memory."""

    def __init__(self, images):
        self.images = (images * 255).to(torch.uint8)

    def __len__(self):
        return len(self.images)


def _set_up(stage, img):
    stage.setup({"train": Images(img)}, DeviceTransform(32, crop_scale=None, hflip=False).resize, (32, 32), 8)
    return stage


def test_controls_keep_shape_and_normalisation():
    imgs = torch.stack([blob_image(32, center=(c, c))[0] for c in (6.0, 14.0, 22.0, 26.0)])
    sift, stats = RelevanceStage("sift")(imgs, 8)
    shuffled = RelevanceStage("shuffled")(imgs, 8)[0]
    uniform, none = RelevanceStage("uniform")(imgs, 8)
    grad = RelevanceStage("gradient")(imgs, 8)[0]
    assert set(stats) == {"no_keypoint_frac"} and none == {}  # what the stage measured, returned
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
    own = RelevanceStage("sift")(img, 8)[0]
    rolled = RelevanceStage("rolled")(img, 8)[0]
    assert not torch.equal(rolled, own) and torch.equal(rolled, roll_relevance(own))
    torch.testing.assert_close(rolled.flatten(1).sort(1).values, own.flatten(1).sort(1).values)  # same values
    shuffled = RelevanceStage("shuffled")(img, 8)[0]
    assert torch.equal(shuffled, own.roll(1, 0))  # B = 2: the other image's map
    fg = foreground_relevance(img, 8)
    assert fg[0].argmax() == 0 and fg[1].argmax() == 15  # the blob's patch
    mean = _set_up(RelevanceStage("mean", mean_images=4), img)(img, 8)[0]
    assert torch.equal(mean[0], mean[1])  # the same map for every image
    torch.testing.assert_close(mean[0], own.mean(0), atol=2e-3, rtol=0)


def test_random_control_drops_at_random():
    src = RelevanceStage("random", seed=0)
    imgs = torch.rand(8, 1, 32, 32)
    a, b = src(imgs, 8)[0], src(imgs, 8)[0]
    assert not torch.equal(a, b)  # fresh noise every batch
    ids = select_tokens(a, 4)
    assert len({tuple(r.tolist()) for r in ids}) > 1  # different images keep different patches


def test_fallbacks_are_counted():
    imgs = torch.cat([blob_image(32, center=(16.0, 16.0)), torch.full((3, 1, 32, 32), 0.5)])
    _, stats = RelevanceStage("sift")(imgs, 8)
    assert float(stats["no_keypoint_frac"]) == 0.75  # 3 of 4 images have no keypoint


def test_blank_images_train_without_nan(tiny_cfg, tmp_path):
    """No keypoints anywhere: the relevance falls back to uniform, guided losses stay finite."""
    cfg = folder_cfg(tiny_cfg, image_folder(tmp_path / "imgs", blank=True), ["guidance=[attention,interrelation]"])
    train(cfg)
    m = run_metrics(cfg)
    assert (m["train/no_keypoint_frac"].dropna() == 1).all() and m["train/no_keypoint_frac"].notna().sum() == 3
    for k in ("train/loss", "train/guidance_loss", "val/loss"):
        assert np.isfinite(m[k].dropna()).all() and m[k].notna().any(), k


# ------------------------------------------------------------------------------------------ composition with the prior
def _batch():
    """Two blobs in opposite corners and one blank image (no keypoints)."""
    return torch.cat([blob_image(32, center=(4.0, 4.0)), blob_image(32, center=(27.0, 27.0)),
                      torch.full((1, 1, 32, 32), 0.5)])


def test_no_composition_is_bit_identical_to_the_image_maps():
    img = _batch()
    kp = detect_keypoints(img)
    own = relevance_from_keypoints(kp, (4, 4), 8, "count")
    for kw in ({}, {"prior_mix": 0.0, "min_keypoints": 0}):
        stage = _set_up(RelevanceStage("sift", **kw), img)
        assert not stage.composes and stage.mean_map is None  # no mean map is even computed
        assert torch.equal(stage(img, 8)[0], own)


@pytest.mark.parametrize("form", ["mixture", "product"])
def test_prior_mix_one_is_the_mean_map_and_zero_evidence_falls_back_to_it(form):
    img = _batch()
    mean = _set_up(RelevanceStage("mean"), img)(img, 8)[0]
    full = _set_up(RelevanceStage("sift", prior_mix=1.0, prior_form=form), img)(img, 8)[0]
    torch.testing.assert_close(full, mean)
    own = RelevanceStage("sift")(img, 8)[0]
    torch.testing.assert_close(own[2], torch.full((4, 4), 1 / 16))  # today: the blank image gets the uniform map
    guarded = _set_up(RelevanceStage("sift", min_keypoints=3, prior_form=form), img)(img, 8)[0]
    torch.testing.assert_close(guarded[2], mean[2])  # ... under min_keypoints, the mean map
    torch.testing.assert_close(guarded.flatten(1).sum(1), torch.ones(3))
    half = _set_up(RelevanceStage("sift", prior_mix=0.5, prior_form=form), img)(img, 8)[0]
    torch.testing.assert_close(half.flatten(1).sum(1), torch.ones(3))
    if form == "mixture":
        torch.testing.assert_close(half[:2], 0.5 * own[:2] + 0.5 * mean[:2])


def test_the_evidence_weight_follows_the_keypoint_count():
    rel, prior = torch.zeros(3, 2, 2), torch.full((1, 2, 2), 0.25)
    rel[:, 0, 0] = 1.0
    out = compose_with_prior(rel, prior, 0.2, torch.tensor([0, 2, 8]), min_keypoints=4)
    # lambda = 1 - 0.8 * min(1, n / 4): 1, 0.6, 0.2
    for b, lam in enumerate((1.0, 0.6, 0.2)):
        torch.testing.assert_close(out[b], (1 - lam) * rel[b] + lam * prior[0])


def test_the_shuffled_control_mixes_the_prior_with_another_images_map():
    img = _batch()[:2]
    own = RelevanceStage("sift")(img, 8)[0]
    mean = _set_up(RelevanceStage("mean"), img)(img, 8)[0]
    mixed = _set_up(RelevanceStage("shuffled", prior_mix=0.5), img)(img, 8)[0]
    torch.testing.assert_close(mixed, 0.5 * own.roll(1, 0) + 0.5 * mean)  # B = 2: the other image's map


@pytest.mark.parametrize("kw, match", [(dict(prior_mix=1.5), "prior_mix=1.5 must be in"),
                                       (dict(prior_mix=-0.1), "prior_mix=-0.1 must be in"),
                                       (dict(min_keypoints=-1), "min_keypoints=-1 must be >= 0"),
                                       (dict(prior_form="sum"), "prior_form='sum'")])
def test_bad_composition_settings_stop_with_a_clear_message(kw, match):
    with pytest.raises(ValueError, match=match):
        RelevanceStage("sift", **kw)
