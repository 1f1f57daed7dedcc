"""Bad input: unreadable and unusual image files, empty or missing folders, config values that do not fit, blank
images; the image-folder defaults (workers, pinning, one random crop on the device)."""
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from siftguide.checks import validate_config
from siftguide.data import ImageFolderDataModule, _FolderImages, collate_skipping
from siftguide.callbacks.knn import KNNEvaluator
from tests.test_resume import _killed_at
from siftguide.train import build, build_module, train

S = 32  # decoded image side in these tests


def _good(path: Path, seed: int, size=(40, 48)):
    """A textured grey PNG with a bright square (SIFT finds keypoints on it)."""
    g = np.random.default_rng(seed)
    a = (g.random(size) * 60).astype(np.uint8)
    a[8:24, 8 + seed % 8 : 24 + seed % 8] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _bad_files(d: Path) -> list[Path]:
    """A zero-byte file, a truncated PNG and a text file named .png, in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.png").write_bytes(b"")
    _good(d / "whole.png", 99)
    data = (d / "whole.png").read_bytes()
    (d / "whole.png").unlink()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "notes.png").write_text("not an image\n")
    return [d / "empty.png", d / "truncated.png", d / "notes.png"]


def _folder(root: Path, n: int = 8, bad: bool = False, val_bad: bool = False, blank: bool = False) -> Path:
    """``root/{train,val}/{c0,c1}`` with ``n`` images per training class (4 per val class)."""
    for split, k in (("train", n), ("val", 4)):
        for c in (0, 1):
            for i in range(k):
                p = root / split / f"c{c}" / f"{i}.png"
                if blank:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("L", (40, 40), 128).save(p)
                else:
                    _good(p, 10 * c + i)
    if bad:
        _bad_files(root / "train" / "c0")
    if val_bad:
        (root / "val" / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def _metrics(cfg) -> pd.DataFrame:
    return pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")


def _folder_cfg(tiny_cfg, root: Path, extra=(), name="folder"):
    return tiny_cfg(["data=image_folder", f"data.root={root}", "data.num_workers=0", "data.batch_size=4",
                     "num_classes=2", "model.in_chans=1", "callbacks.knn.bank_size=8", "callbacks.knn.query_size=8",
                     "trainer.max_steps=3", *extra], name=name, fashion_mnist=False)


# ---------------------------------------------------------------------------------------------- decoding
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

    rgb, grey = _FolderImages(str(d), S, labels=False, channels=3), _FolderImages(str(d), S, labels=False, channels=1)
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
    _folder(tmp_path)
    wide = np.zeros((40, 120), np.uint8)
    wide[:, 50:70] = 255  # a bright band in the middle
    Image.fromarray(wide).save(tmp_path / "train" / "c0" / "wide.png")
    ds = _FolderImages(str(tmp_path / "train"), S, labels=True, channels=1)
    for i in range(len(ds)):
        assert torch.equal(ds[i]["image"], ds[i]["image"])
    w = next(ds[i]["image"] for i in range(len(ds)) if ds.samples[i][0].endswith("wide.png"))
    # 120x40 -> 96x32, the crop keeps x 32..64: the band (x 40..56 at that scale) fills its columns 8..24
    # (squashing to 32x32 would make it 5 columns wide)
    assert w[0, :, 10:22].float().mean() > 200 and w[0, :, :4].max() < 60 and w[0, :, -4:].max() < 60


def test_knn_bank_is_the_same_at_every_validation(tiny_cfg, tmp_path):
    cfg = _folder_cfg(tiny_cfg, _folder(tmp_path / "imgs"))
    dm = instantiate(cfg.data)
    dm.setup()
    module = build_module(cfg)
    knn = KNNEvaluator(bank_size=12, query_size=8, batch_size=4)
    bx1, by1 = knn._images_labels(dm.train_set, 12)
    bx2, by2 = knn._images_labels(dm.train_set, 12)
    assert torch.equal(bx1, bx2) and torch.equal(by1, by2)
    torch.testing.assert_close(knn.features(module, bx1), knn.features(module, bx2), rtol=0, atol=0)


def test_knn_bank_leaves_unreadable_files_out(tiny_cfg, tmp_path):
    cfg = _folder_cfg(tiny_cfg, _folder(tmp_path / "imgs", n=4, bad=True))
    dm = instantiate(cfg.data)
    dm.setup()
    knn = KNNEvaluator(bank_size=100, query_size=8, batch_size=4)
    bx, by = knn._images_labels(dm.train_set, 100)
    assert len(dm.train_set) == 11 and len(by) == 8  # 3 unreadable files: not black images with a label
    assert bool((bx.flatten(1).amax(1) > 0).all())


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


# ---------------------------------------------------------------------------------------------- bad files
def test_unreadable_files_are_skipped_counted_and_named(tmp_path, caplog):
    _folder(tmp_path, n=3)
    bad = _bad_files(tmp_path / "train" / "c1")
    dm = ImageFolderDataModule(str(tmp_path), img_size=S, batch_size=9, num_workers=0, num_classes=2, in_chans=1)
    dm.setup()
    assert len(dm.train_set) == 9
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):
        (batch,) = list(dm.train_dataloader())
        (batch2,) = list(dm.train_dataloader())  # a second epoch: counted again, not warned again
    assert batch["image"].shape == (6, 1, S, S) and batch["label"].shape == (6,) and batch["index"].shape == (6,)
    assert int(batch["skipped"]) == 3 and int(batch2["skipped"]) == 3
    good = {i for i, (p, _) in enumerate(dm.train_set.samples) if Path(p) not in bad}
    assert set(batch["index"].tolist()) == good
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 3 and all(any(str(p) in m for m in warned) for p in bad)


def test_a_batch_of_only_unreadable_files_is_skipped_not_nan(tiny_cfg, tmp_path):
    cfg = _folder_cfg(tiny_cfg, _folder(tmp_path / "imgs"))
    module = build_module(cfg)
    samples = [{"image": torch.zeros(1, S, S, dtype=torch.uint8), "label": torch.tensor(0), "index": i,
                "valid": False} for i in range(4)]
    empty = collate_skipping(samples)
    assert empty["image"].shape == (0, 1, S, S) and int(empty["skipped"]) == 4
    batch = module.on_after_batch_transfer(empty, 0)
    assert module.training_step(batch, 0) is None  # no loss: Lightning skips the optimizer step
    module._eval_step(batch, "val", align=True)  # nothing to evaluate, no error
    module.max_empty_batches = 3
    with pytest.raises(RuntimeError, match="in a row held no readable image"):
        module.training_step(batch, 1)
        module.training_step(batch, 2)


def test_run_with_bad_files_finishes_and_logs_skips(tiny_cfg, tmp_path, caplog):
    root = _folder(tmp_path / "imgs", bad=True, val_bad=True)
    _good(root / "train" / "c1" / "extra.png", 7)  # 17 good + 3 bad = 5 batches of 4: one epoch draws every file
    cfg = _folder_cfg(tiny_cfg, root, ["trainer.max_steps=5", "trainer.val_check_interval=2"])
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):
        train(cfg)
    m = _metrics(cfg)
    skipped = m["data/skipped"].dropna()
    assert skipped.is_monotonic_increasing and skipped.iloc[-1] == 3 and len(skipped) == 5  # cumulative
    assert (m["val/skipped"].dropna() == 1).all() and m["val/skipped"].notna().sum() == 3  # 1 bad val file per pass
    assert np.isfinite(m["train/loss"].dropna()).all() and m["train/loss"].notna().sum() == 5
    text = caplog.text
    assert "truncated.png" in text and "empty.png" in text and "broken.png" in text


def test_skipped_count_survives_a_resume(tiny_cfg, tmp_path, monkeypatch):
    # killed after step 3 (checkpoint at step 2), resumed with ckpt_path=last: data/skipped ends at the whole
    # run's count, as in the uninterrupted run, not at the count since the resume
    root = _folder(tmp_path / "imgs", bad=True)
    _good(root / "train" / "c1" / "extra.png", 7)
    over = ["trainer.max_steps=5", "trainer.val_check_interval=2"]
    cfg = _folder_cfg(tiny_cfg, root, over, name="killed")
    with monkeypatch.context() as m:
        _killed_at(m, 3)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg)
    train(_folder_cfg(tiny_cfg, root, [*over, "ckpt_path=last"], name="killed"))
    skipped = _metrics(cfg)["data/skipped"].dropna()
    assert skipped.iloc[-1] == 3 and skipped.is_monotonic_increasing


def test_an_unreadable_dataset_stops_with_a_clear_error(tiny_cfg, tmp_path):
    root = _folder(tmp_path / "imgs")
    for p in (root / "train").rglob("*.png"):
        p.write_bytes(b"")  # every training file empty: no batch ever has an image
    # without the check, all-empty steps would count towards max_steps and save an untrained model
    # (kNN off: its own check, no readable bank image, would stop the run first; see the kNN test above; the
    # ceiling on the skipped share off: it would stop the run after one epoch, see the test below)
    cfg = _folder_cfg(tiny_cfg, root, ["trainer.max_steps=30", "callbacks.knn=null", "data.max_skip_fraction=1"],
                      name="unreadable")
    with pytest.raises(RuntimeError, match="in a row held no readable image"):
        train(cfg)
    with pytest.raises(RuntimeError, match="kNN evaluation: none of the first"):  # with kNN: the bank check
        train(_folder_cfg(tiny_cfg, root, ["trainer.max_steps=30", "data.max_skip_fraction=1"],
                          name="unreadable_knn"))


def test_a_mostly_unreadable_folder_stops_with_the_files_named(tiny_cfg, tmp_path, caplog):
    """94 % of the training files unreadable: after one epoch (32 samples, fewer than 256) the run stops naming
    the files, instead of finishing trained on two images; the end-of-run summary lists them too."""
    root = _folder(tmp_path / "imgs", n=1)
    for c in (0, 1):
        for i in range(15):
            (root / "train" / f"c{c}" / f"bad{i:02d}.png").write_bytes(b"")
    cfg = _folder_cfg(tiny_cfg, root, ["trainer.max_steps=30", "callbacks.knn=null"], name="mostly")
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):
        with pytest.raises(RuntimeError, match=r"30 of the 32 training samples seen \(94%\) were unreadable, more "
                                               r"than data.max_skip_fraction=0.5.*bad"):
            train(cfg)
    assert "30 unreadable files were skipped in this run (30 of 32 training samples seen)" in caplog.text
    result = (Path(cfg.paths.output_dir) / "results.json").read_text()
    assert '"status": "failed"' in result and "UnreadableDataError" in result
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):  # a ceiling above the share: trains
        train(_folder_cfg(tiny_cfg, root, ["trainer.max_steps=2", "callbacks.knn=null", "data.max_skip_fraction=0.95"],
                          name="tolerant"))
    assert "unreadable files were skipped in this run" in caplog.text


def test_each_unreadable_file_is_warned_once_per_run_not_per_worker(tiny_cfg, tmp_path, caplog):
    """Two loader workers, three epochs: every worker meets the bad files, the main process warns once per file
    (the workers' own warnings never reached the run's log)."""
    root = _folder(tmp_path / "imgs", n=3, bad=True)
    cfg = _folder_cfg(tiny_cfg, root, ["data.num_workers=2", "trainer.max_steps=6", "trainer.val_check_interval=6",
                                       "callbacks.knn=null", "data.batch_size=3"], name="workers")
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):
        train(cfg)
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert sorted(m.split()[3] for m in warned) == sorted(str(p) for p in _bad_files_of(root))
    assert _metrics(cfg)["data/skipped"].dropna().iloc[-1] == 6  # 3 files x 2 epochs: counted every time


def _bad_files_of(root: Path) -> list[Path]:
    return [root / "train" / "c0" / n for n in ("empty.png", "truncated.png", "notes.png")]


def test_blank_images_train_without_nan(tiny_cfg, tmp_path):
    """No keypoints anywhere: the relevance falls back to uniform, guided losses stay finite."""
    cfg = _folder_cfg(tiny_cfg, _folder(tmp_path / "imgs", blank=True), ["guidance=[attention,interrelation]"])
    train(cfg)
    m = _metrics(cfg)
    assert (m["train/no_keypoint_frac"].dropna() == 1).all() and m["train/no_keypoint_frac"].notna().sum() == 3
    for k in ("train/loss", "train/guidance_loss", "val/loss"):
        assert np.isfinite(m[k].dropna()).all() and m[k].notna().any(), k


# ---------------------------------------------------------------------------------------------- folders
@pytest.mark.parametrize("case, match", [
    ("empty_class", r"class folder\(s\) c1 .* hold no images"),
    ("no_classes", "has no class subfolders"),
    ("no_train", r"train' does not exist"),
    ("class_mismatch", r"only in train: \['c1'\]"),
    ("too_many_classes", "set num_classes=2"),
    ("unlabelled_empty", "no images"),
])
def test_bad_folders_fail_before_training_naming_the_folder(tmp_path, case, match):
    root = _folder(tmp_path / "imgs", n=2)
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
    cfg = _folder_cfg(tiny_cfg, tmp_path, name="defaults")
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


# ---------------------------------------------------------------------------------------------- config checks
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


@pytest.mark.parametrize("overrides, match", [
    (["guidance.attention.layers=[5]"], r"layer index 5 out of range for a model with 2 blocks \(use -2..1\)"),
    (["guidance.attention.heads=[2]"], r"heads \[2\] out of range for 2 heads"),
    (["guidance=interrelation", "guidance.interrelation.layers=[-3]"], "layer index -3 out of range"),
    (["guidance=prior", "guidance.prior.layers=[2]"], "layer index 2 out of range"),
    (["module.align_layers=[7]"], "layer index 7 out of range"),
])
def test_guidance_layers_and_heads_out_of_range_fail_at_build(tiny_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(tiny_cfg(overrides))


def test_directory_symlink_loops_are_not_followed(tmp_path, caplog):
    """`train/c0/loop -> .` made torchvision's scan count class c0's 8 images 41 times (328); links to folders
    elsewhere are still followed. Without links the samples are torchvision's, in its order."""
    from torchvision.datasets import ImageFolder

    root = _folder(tmp_path / "imgs", n=8)
    (root / "train" / "c0" / "sub").mkdir()
    _good(root / "train" / "c0" / "sub" / "0.png", 5)
    assert _FolderImages(str(root / "train"), S, True, 1).samples == ImageFolder(str(root / "train")).samples
    (root / "train" / "c0" / "sub" / "0.png").unlink()
    (root / "train" / "c0" / "sub").rmdir()
    (root / "train" / "c0" / "loop").symlink_to(".")
    (root / "train" / "c1" / "up").symlink_to("../..")  # the dataset root: holds c1 itself
    _good(tmp_path / "elsewhere" / "x.png", 3)
    (root / "train" / "c1" / "more").symlink_to(tmp_path / "elsewhere")  # a folder elsewhere: read
    for labels in (True, False):
        with caplog.at_level(logging.WARNING, logger="siftguide.data"):
            ds = _FolderImages(str(root / "train"), S, labels, channels=1)
        paths = [Path(p) for p, _ in ds.samples]
        assert len(paths) == 17 and len({p.resolve() for p in paths}) == 17
        assert sorted(t for _, t in ds.samples) == ([0] * 8 + [1] * 9 if labels else [-1] * 17)
        assert f"not following {root / 'train' / 'c0' / 'loop'}: a symlink to {root / 'train' / 'c0'}" in caplog.text
        assert f"not following {root / 'train' / 'c1' / 'up'}" in caplog.text
        caplog.clear()
