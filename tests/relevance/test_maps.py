"""siftguide.relevance.maps: keypoints -> per-patch relevance (counts, responses, Gaussian splats), normalisation,
temperature, smoothing and the uniform mix, the gradient map, patch counting."""
import pytest
import torch

from siftguide import patch_relevance
from siftguide.relevance import (MODES, Keypoints, RelevanceStage, detect_keypoints, gradient_relevance,
                                 keypoint_patch_counts, normalize_relevance, relevance_from_keypoints)
from tests.conftest import blob_image
from tests.oracle import photo_batch


def _kp(points, scales=None, responses=None):
    """Keypoints for one image from a list of (x, y)."""
    n = len(points)
    xy = torch.tensor(points, dtype=torch.float32).view(1, n, 2)
    s = torch.tensor(scales or [1.0] * n).view(1, n)
    r = torch.tensor(responses or [1.0] * n).view(1, n)
    return Keypoints(xy, s, r, torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.long))


@pytest.mark.parametrize("mode", MODES)
def test_relevance_shape_normalisation_and_peak(mode):
    img = blob_image(64, center=(40.0, 8.0), sigma=3.0, batch=2)
    rel = patch_relevance(img, patch_size=16, mode=mode)
    assert rel.shape == (2, 4, 4)
    assert (rel >= 0).all()
    torch.testing.assert_close(rel.flatten(1).sum(1), torch.ones(2))
    # blob at x=40, y=8 -> patch row 0, column 2
    assert int(rel[0].flatten().argmax()) == 2


def test_uniform_fallback_without_keypoints():
    rel = patch_relevance(torch.full((3, 1, 32, 32), 0.3), patch_size=8)
    torch.testing.assert_close(rel, torch.full((3, 4, 4), 1 / 16))


def test_count_and_response_modes_weight_patches():
    kp = _kp([(2.0, 2.0), (3.0, 3.0), (12.0, 2.0)], responses=[0.1, 0.1, 0.8])
    counts = relevance_from_keypoints(kp, (1, 2), 8, "count")
    torch.testing.assert_close(counts, torch.tensor([[[2 / 3, 1 / 3]]]))
    resp = relevance_from_keypoints(kp, (1, 2), 8, "response")
    torch.testing.assert_close(resp, torch.tensor([[[0.2, 0.8]]]))


def test_gaussian_splat_spreads_with_scale():
    small = relevance_from_keypoints(_kp([(7.5, 7.5)], scales=[0.5]), (2, 2), 8, "gaussian")
    large = relevance_from_keypoints(_kp([(7.5, 7.5)], scales=[8.0]), (2, 2), 8, "gaussian")
    # at the shared corner of four patches both spread evenly; a keypoint inside a patch stays there if small
    torch.testing.assert_close(large, torch.full((1, 2, 2), 0.25), atol=1e-4, rtol=0)
    inside = relevance_from_keypoints(_kp([(3.5, 3.5)], scales=[0.5]), (2, 2), 8, "gaussian")
    assert inside[0, 0, 0] > 0.99 and small.sum().item() == pytest.approx(1.0)


def test_temperature_smoothing_and_uniform_mix():
    mass = torch.tensor([[[3.0, 1.0], [0.0, 0.0]]])
    sharp = normalize_relevance(mass, temperature=0.5)
    flat = normalize_relevance(mass, temperature=4.0)
    assert sharp[0, 0, 0] > normalize_relevance(mass)[0, 0, 0] > flat[0, 0, 0]
    mixed = normalize_relevance(mass, uniform_mix=0.5)
    assert mixed.min() == pytest.approx(0.125)
    smooth = normalize_relevance(mass, smoothing=1.0)
    assert smooth[0, 1, 0] > 0 and smooth.sum() == pytest.approx(1.0)
    for bad in (dict(temperature=0.0), dict(uniform_mix=1.5)):
        with pytest.raises(ValueError):
            normalize_relevance(mass, **bad)
    with pytest.raises(ValueError, match=r"\(B, Gh, Gw\)"):
        normalize_relevance(torch.ones(4, 4))


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="count"):
        relevance_from_keypoints(_kp([(1.0, 1.0)]), (1, 1), 8, "nope")
    with pytest.raises(ValueError, match="sift"):
        RelevanceStage(kind="nope")


def test_gradient_relevance_is_high_on_edges():
    img = torch.zeros(1, 1, 32, 32)
    img[:, :, :, 16:] = 1.0
    rel = gradient_relevance(img, 8)
    assert rel[0, :, 1:3].sum() > 0.99


def test_relevance_follows_detector_settings():
    img = blob_image(64, batch=1)
    kp = detect_keypoints(img, contrast_threshold=10.0)
    assert not kp.valid.any()
    rel = patch_relevance(img, patch_size=16, contrast_threshold=10.0)
    torch.testing.assert_close(rel, torch.full((1, 4, 4), 1 / 16))


def test_patch_counts_sum_to_valid_keypoints():
    x = photo_batch(64, crops_per_photo=1)[:4].float() / 255
    counts = keypoint_patch_counts(x, patch_size=16, max_keypoints=256)
    kp = detect_keypoints(x, max_keypoints=256)
    assert counts.shape == (4, 4, 4)
    assert torch.equal(counts.flatten(1).sum(1), kp.valid.sum(1).float())


def test_the_dense_mode_leaves_mass_on_a_faint_object_that_count_misses():
    """A faint small blob gives no keypoint (its DoG extremum is below the contrast threshold): count falls back to
    the uniform map; mode=dog puts the most mass on the blob's patch, and none on a flat image."""
    from siftguide.relevance import RelevanceStage, detect_keypoints, dog_relevance

    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    faint = (0.5 + 0.02 * torch.exp(-((xx - 44) ** 2 + (yy - 12) ** 2) / (2 * 2.0**2))).view(1, 1, 64, 64)
    assert int(detect_keypoints(faint).valid.sum()) == 0
    count = RelevanceStage("sift")(faint, 16)[0]
    torch.testing.assert_close(count, torch.full((1, 4, 4), 1 / 16))
    dense, stats = RelevanceStage("sift", mode="dog")(faint, 16)
    assert stats == {} and int(dense.flatten(1).argmax()) == 2 and float(dense[0, 0, 2]) > 0.5  # row 0, column 2
    torch.testing.assert_close(dense.flatten(1).sum(1), torch.ones(1))
    flat = dog_relevance(torch.full((2, 1, 64, 64), 0.3), 16)
    torch.testing.assert_close(flat, torch.full((2, 4, 4), 1 / 16))  # no structure: uniform, not NaN
    with pytest.raises(ValueError, match="relevance.min_keypoints counts keypoints"):
        RelevanceStage("sift", mode="dog", min_keypoints=2)
