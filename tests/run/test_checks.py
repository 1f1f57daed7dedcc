"""siftguide.run.checks: config values that do not fit are one readable error before anything is trained; the shipped
configs pass."""
from pathlib import Path

import pytest

from siftguide.run.checks import validate_config
from siftguide.train import train


@pytest.mark.parametrize("overrides, match", [
    (["model.img_size=64", "model.patch_size=7"], r"model.patch_size=7 does not divide model.img_size=64.*9x9 grid"),
    (["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 trains nothing"),
    (["trainer.max_steps=-2"], "trainer.max_steps=-2 is not a step count"),
    (["trainer.max_steps=-1", "trainer.max_epochs=-1"], "never ends"),
    (["model.num_heads=3"], "multiple of model.num_heads=3"),
    (["transform=imagenet"], "transform.mean has 3 values for model.in_chans=1"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc' is not an integer"),
    (["optimizer.lr=fast", "data.batch_size=2.5"], r"data.batch_size=2.5 is not an integer \(a float\)\n.*"
                                                   r"optimizer.lr='fast' is not a number"),
    (["num_classes=0"], r"model.num_classes=0: objective=supervised needs a classifier head.*FashionMNISTDataModule "
                        r"has 10 classes\): set num_classes=10"),
    (["num_classes=5"], "model.num_classes=5 is less than the classes of the data"),
])
def test_config_values_that_do_not_fit_are_errors_before_training(tiny_cfg, overrides, match):
    cfg = tiny_cfg(overrides)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # stopped before anything was trained


def test_config_checks_accept_the_shipped_configs(tiny_cfg, tmp_path):
    validate_config(tiny_cfg())
    validate_config(tiny_cfg(["objective=mae", "num_classes=0"]))  # no head needed: the probe is off
    validate_config(tiny_cfg(["num_classes=12"]))  # more logits than classes: unused ones
    validate_config(tiny_cfg(["trainer.max_steps=-1", "trainer.max_epochs=2"]))  # epochs instead of steps
    validate_config(tiny_cfg(["model.img_size=64", "model.patch_size=16"]))
    validate_config(tiny_cfg(["data=image_folder", f"data.root={tmp_path}"], fashion_mnist=False))


def test_image_folder_root_is_checked_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="needs data.root"):
        validate_config(tiny_cfg(["data=image_folder"], fashion_mnist=False))
    with pytest.raises(ValueError, match=f"data.root={tmp_path / 'nope'} is not a folder"):
        train(tiny_cfg(["data=image_folder", f"data.root={tmp_path / 'nope'}"], fashion_mnist=False))
    with pytest.raises(ValueError, match="data.val_root=.* is not a folder"):
        validate_config(tiny_cfg(["data=image_folder", f"data.root={tmp_path}", f"data.val_root={tmp_path / 'v'}"],
                                 fashion_mnist=False))
