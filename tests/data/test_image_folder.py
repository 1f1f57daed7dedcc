"""ImageFolderDataModule: unusual and unreadable image files, deterministic decoding that keeps the centre, empty or
missing folders, symlink loops, the defaults that follow the machine, unlabelled data with a supervised objective."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siftguide.data import ImageFolderDataModule, FolderImages
from siftguide.train import train
from tests.helpers import S, bad_files, folder_cfg, good_png, image_folder


def test_unusual_image_modes_decode_to_8bit(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.full((20, 30), 32768, np.uint16)).save(d / "a_16bit.png")  # half of the 16-bit range
    Image.fromarray(np.full((20, 20), 32768, np.int32), "I").save(d / "a_int32.tif")  # PIL mode I
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, but only the left half is opaque
    rgba[:, :10, 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "b_rgba.png")
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(d / "c_cmyk.jpg")  # no ink: white
    Image.new("L", (20, 20), 77).save(d / "d_grey.png")
    Image.new("RGB", (20, 20), (200, 100, 50)).save(d / "e_rgb.png")
    Image.new("L", (1, 1), 200).save(d / "f_1x1.png")
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(d / "g_palette.png")
    Image.new("LA", (20, 20), (250, 0)).save(d / "h_la.png")  # fully transparent grey

    rgb, grey = FolderImages(str(d), S, labels=False, channels=3), FolderImages(str(d), S, labels=False, channels=1)
    names = [Path(p).stem for p, _ in rgb.samples]
    x3 = {n: rgb[i] for i, n in enumerate(names)}
    x1 = {n: grey[i] for i, n in enumerate(names)}
    for n in names:
        assert x3[n]["valid"] and x1[n]["valid"], n
        assert x3[n]["image"].shape == (3, S, S) and x1[n]["image"].shape == (1, S, S), n
        assert x3[n]["image"].dtype == torch.uint8
    # 16 bit scaled (32768 * 255 / 65535 = 127.5 -> 128), not clipped to white
    assert x1["a_16bit"]["image"].unique().tolist() == [128] and x3["a_int32"]["image"].unique().tolist() == [128]
    # alpha composited over black: the opaque half is red, the transparent half black (its stored red hidden)
    img = x3["b_rgba"]["image"]
    assert img[0, :, :12].float().mean() > 250 and img[:, :, -12:].max() == 0
    assert x1["c_cmyk"]["image"].min() >= 250  # CMYK converted, not garbage
    assert torch.equal(x3["d_grey"]["image"][0], x3["d_grey"]["image"][2]) and x3["d_grey"]["image"].max() == 77
    assert x1["e_rgb"]["image"].unique().tolist() == [round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)]  # PIL luma
    assert x1["f_1x1"]["image"].unique().tolist() == [200]  # resized up to S x S
    assert x3["g_palette"]["image"][:, 0, 0].tolist() == [10, 200, 30]
    assert x1["h_la"]["image"].max() == 0


def test_decoding_is_deterministic_and_keeps_the_centre(tmp_path):
    """The CPU side has no random crop any more: the same index gives the same tensor (the kNN bank then is
    the same at every validation), and a wide image keeps its centre (shorter side -> S, centre crop)."""
    image_folder(tmp_path)
    wide = np.zeros((40, 120), np.uint8)
    wide[:, 50:70] = 255  # a bright band in the middle
    Image.fromarray(wide).save(tmp_path / "train" / "c0" / "wide.png")
    ds = FolderImages(str(tmp_path / "train"), S, labels=True, channels=1)
    for i in range(len(ds)):
        assert torch.equal(ds[i]["image"], ds[i]["image"])
    w = next(ds[i]["image"] for i in range(len(ds)) if ds.samples[i][0].endswith("wide.png"))
    # 120x40 -> 96x32, the crop keeps x 32..64: the band (x 40..56 at that scale) fills its columns 8..24
    # (squashing to 32x32 would make it 5 columns wide)
    assert w[0, :, 10:22].float().mean() > 200 and w[0, :, :4].max() < 60 and w[0, :, -4:].max() < 60


def test_unreadable_files_are_skipped_counted_and_named(tmp_path, caplog):
    image_folder(tmp_path, n=3)
    bad = bad_files(tmp_path / "train" / "c1")
    dm = ImageFolderDataModule(str(tmp_path), img_size=S, batch_size=9, num_workers=0, num_classes=2, in_chans=1)
    dm.setup()
    assert len(dm.train_set) == 9
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):
        (batch,) = list(dm.train_dataloader())
        (batch2,) = list(dm.train_dataloader())  # a second epoch: counted again, not warned again
    assert batch["image"].shape == (6, 1, S, S) and batch["label"].shape == (6,) and batch["index"].shape == (6,)
    assert len(batch["skipped_files"]) == 3 and len(batch2["skipped_files"]) == 3
    good = {i for i, (p, _) in enumerate(dm.train_set.samples) if Path(p) not in bad}
    assert set(batch["index"].tolist()) == good
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 3 and all(any(str(p) in m for m in warned) for p in bad)


@pytest.mark.parametrize("case, match", [
    ("empty_class", r"class folder\(s\) c1 .* hold no images"),
    ("no_classes", "has no class subfolders"),
    ("no_train", r"train' does not exist"),
    ("class_mismatch", r"only in train: \['c1'\]"),
    ("too_many_classes", "set num_classes=2"),
    ("unlabelled_empty", "no images"),
])
def test_bad_folders_fail_before_training_naming_the_folder(tmp_path, case, match):
    root = image_folder(tmp_path / "imgs", n=2)
    labels, num_classes = True, 2
    if case == "empty_class":
        for p in (root / "train" / "c1").iterdir():
            p.unlink()
    elif case == "no_classes":
        for p in list((root / "train").rglob("*.png")):
            p.rename(root / "train" / f"{p.parent.name}_{p.name}")
        for c in ("c0", "c1"):
            (root / "train" / c).rmdir()
    elif case == "no_train":
        (root / "train").rename(root / "training")
    elif case == "class_mismatch":
        (root / "val" / "c1").rename(root / "val" / "c2")
    elif case == "too_many_classes":
        num_classes = 1
    elif case == "unlabelled_empty":
        labels = False
        for p in (root / "train").rglob("*.png"):
            p.rename(p.with_suffix(".txt"))
    dm = ImageFolderDataModule(str(root), img_size=S, batch_size=2, num_workers=0, num_classes=num_classes,
                               in_chans=1, labels=labels)
    with pytest.raises((FileNotFoundError, ValueError), match=match) as e:
        dm.setup()
    if case != "too_many_classes":
        assert str(root) in str(e.value)


def test_folder_defaults_follow_the_machine(tiny_cfg, tmp_path, monkeypatch):
    cfg = folder_cfg(tiny_cfg, tmp_path, name="defaults")
    assert tiny_cfg(["data=image_folder", f"data.root={tmp_path}"], name="d2",
                    fashion_mnist=False).data.num_workers is None
    for cpus, want in ((1, 0), (2, 1), (4, 3), (64, 8)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(cpus)), raising=False)
        assert ImageFolderDataModule(str(tmp_path), num_workers=None).num_workers == want
    assert ImageFolderDataModule(str(tmp_path), num_workers=2).num_workers == 2
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert ImageFolderDataModule(str(tmp_path)).pin_memory is False
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert ImageFolderDataModule(str(tmp_path)).pin_memory is True
    assert ImageFolderDataModule(str(tmp_path), pin_memory=False).pin_memory is False
    assert cfg.data.pin_memory is None


def test_directory_symlink_loops_are_not_followed(tmp_path, caplog):
    """`train/c0/loop -> .` made torchvision's scan count class c0's 8 images 41 times (328); links to folders
    elsewhere are still followed. Without links the samples are torchvision's, in its order."""
    from torchvision.datasets import ImageFolder

    root = image_folder(tmp_path / "imgs", n=8)
    (root / "train" / "c0" / "sub").mkdir()
    good_png(root / "train" / "c0" / "sub" / "0.png", 5)
    assert FolderImages(str(root / "train"), S, True, 1).samples == ImageFolder(str(root / "train")).samples
    (root / "train" / "c0" / "sub" / "0.png").unlink()
    (root / "train" / "c0" / "sub").rmdir()
    (root / "train" / "c0" / "loop").symlink_to(".")
    (root / "train" / "c1" / "up").symlink_to("../..")  # the dataset root: holds c1 itself
    good_png(tmp_path / "elsewhere" / "x.png", 3)
    (root / "train" / "c1" / "more").symlink_to(tmp_path / "elsewhere")  # a folder elsewhere: read
    for labels in (True, False):
        with caplog.at_level(logging.WARNING, logger="siftguide.data"):
            ds = FolderImages(str(root / "train"), S, labels, channels=1)
        paths = [Path(p) for p, _ in ds.samples]
        assert len(paths) == 17 and len({p.resolve() for p in paths}) == 17
        assert sorted(t for _, t in ds.samples) == ([0] * 8 + [1] * 9 if labels else [-1] * 17)
        assert f"not following {root / 'train' / 'c0' / 'loop'}: a symlink to {root / 'train' / 'c0'}" in caplog.text
        assert f"not following {root / 'train' / 'c1' / 'up'}" in caplog.text
        caplog.clear()


def test_supervised_on_unlabelled_data_is_a_clear_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg(["data=image_folder", f"data.root={tmp_path}", "data.labels=false"], name="bad",
                   fashion_mnist=False)
    with pytest.raises(ValueError, match="objective=mae"):
        train(cfg)
