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
