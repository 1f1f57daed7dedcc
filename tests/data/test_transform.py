"""DeviceTransform: resize and augmentation on the device (the random crop there, not in the loaders)."""
import pytest
import torch
from hydra.utils import instantiate

from siftguide.data import DeviceTransform


def test_device_transform_resizes_and_augments():
    tf = DeviceTransform(64)
    x8 = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    a = tf(x8, train=False)
    assert a.shape == (4, 1, 64, 64) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    torch.manual_seed(0)
    b = tf(x8, train=True)
    assert b.shape == (4, 1, 64, 64) and not torch.equal(a, b)
    torch.testing.assert_close(tf(x8, train=False), a)  # evaluation is deterministic
    n = tf.normalize(a)
    assert n.shape == a.shape
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tf(torch.rand(28, 28), train=False)


def test_the_random_crop_is_on_the_device(tiny_cfg, tmp_path):
    import kornia.augmentation as K

    for name, flip in (("imagenet", True), ("grey", False)):
        tf = instantiate(tiny_cfg([f"transform={name}", "model.in_chans=3" if flip else "model.in_chans=1"],
                                  name=name).transform)
        kinds = [type(a) for a in tf.augment.children()]
        assert K.RandomResizedCrop in kinds and (K.RandomHorizontalFlip in kinds) == flip
        x = torch.randint(0, 256, (4, 3 if flip else 1, 32, 32), dtype=torch.uint8)
        torch.manual_seed(0)
        assert not torch.equal(tf(x, train=True), tf(x, train=False))


# ------------------------------------------------------------------------------------------ guided crops
def _one_patch_map(b, row=1, col=2, grid=4):
    d = torch.zeros(b, grid, grid)
    d[:, row, col] = 1.0
    return d


def _crop_centres(matrix, size):
    """Where the centre of each ``size`` px view comes from in the resized image: ``(V, 2)`` (x, y)."""
    c = torch.linalg.inv(matrix) @ torch.tensor([(size - 1) / 2, (size - 1) / 2, 1.0])
    return c[:, :2] / c[:, 2:]


def test_guided_crops_centre_every_crop_on_the_map():
    from siftguide.data import MultiCropTransform

    t = MultiCropTransform(32, global_scale=(0.1, 0.2), local_crops=2, local_size=16, local_scale=(0.05, 0.1),
                           guided_crops=1.0)
    torch.manual_seed(0)
    v = t.views(torch.rand(8, 1, 32, 32), True, relevance=lambda x: _one_patch_map(x.shape[0]))
    for matrix, size in ((v.matrix, 32), (v.local_matrix, 16)):
        c = _crop_centres(matrix, size)  # patch (row 1, col 2) of 8 px: x in [15.5, 23.5], y in [7.5, 15.5]
        assert ((c[:, 0] >= 15.0) & (c[:, 0] <= 24.0) & (c[:, 1] >= 7.0) & (c[:, 1] <= 16.0)).all(), c
    # p = 0.5: about half the crops move there
    t.guided_crops = 0.5
    v = t.views(torch.rand(64, 1, 32, 32), True, relevance=lambda x: _one_patch_map(x.shape[0]))
    c = _crop_centres(v.matrix, 32)
    inside = ((c[:, 0] >= 15.0) & (c[:, 0] <= 24.0) & (c[:, 1] >= 7.0) & (c[:, 1] <= 16.0)).float().mean()
    assert 0.5 < inside < 0.8  # half moved, plus the uniform crops that land there by chance (about 1/16)


def test_guided_crops_off_is_the_uniform_crops_and_bad_values_stop():
    from siftguide.data import MultiCropTransform

    x = torch.rand(4, 1, 32, 32)
    outs = []
    for kw in ({}, {"relevance": lambda x: pytest.fail("p = 0 must not read the relevance")}):
        torch.manual_seed(0)
        v = MultiCropTransform(32, local_crops=2, local_size=16, guided_crops=0.0).views(x, True, **kw)
        outs.append((v.image, v.matrix, v.local))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    with pytest.raises(ValueError, match="transform.guided_crops must be a probability"):
        MultiCropTransform(32, guided_crops=1.5)
    with pytest.raises(ValueError, match="needs the images' relevance"):
        MultiCropTransform(32, guided_crops=0.5).views(x, True)
