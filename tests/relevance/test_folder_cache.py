"""The on-disk keypoint cache for image folders: build, reuse, files added/changed (also replaced by a same-size file
with its mtime kept), corrupt files, unreadable images, an unwritable or read-only directory, DDP shards, and training
through it."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from siftguide.data import DeviceTransform, ImageFolderDataModule
from siftguide.relevance import detect_keypoints, folder_cache
from siftguide.relevance.cache import pack_keypoints
from siftguide.relevance.folder_cache import FolderKeypointCache, WithKeypoints, supports_folder_cache
from tests.helpers import write_folder

SIFT = dict(max_keypoints=32)
SIZE = 48


def dataset(root: Path):
    dm = ImageFolderDataModule(str(root), img_size=SIZE, batch_size=4, num_workers=0, in_chans=1, num_classes=2)
    dm.setup()
    return dm


def prepare(ds, cache_dir, **kw) -> FolderKeypointCache:
    transform = DeviceTransform(SIZE)
    return FolderKeypointCache.prepare(ds, transform.resize, SIFT, transform.size, cache_dir, batch_size=5,
                                       progress=False, **kw)


@pytest.fixture
def counting(monkeypatch):
    """Images detected by the cache builds (a list of batch sizes)."""
    seen: list[int] = []
    real = folder_cache.detect_keypoints

    def count(x, **kw):
        seen.append(x.shape[0])
        return real(x, **kw)

    monkeypatch.setattr(folder_cache, "detect_keypoints", count)
    return seen


def test_build_stores_the_keypoints_of_the_loaded_image(tmp_path, counting):
    write_folder(tmp_path / "data")
    dm = dataset(tmp_path / "data")
    assert supports_folder_cache(dm.train_set)
    cache = prepare(dm.train_set, tmp_path / "cache")
    assert sum(counting) == len(dm.train_set) == len(cache) == 12
    files = {p.name for p in cache.directory.iterdir()}
    assert {"keypoints.npy", "count.npy", "files.txt", "stat.npy", "meta.json"} <= files
    # each row holds the keypoints of the image as the loader delivers it, resized like the device pipeline
    images = torch.stack([dm.train_set[i]["image"] for i in range(len(dm.train_set))])
    ref, count = pack_keypoints(detect_keypoints(DeviceTransform(SIZE).resize(images), **SIFT))
    got, got_count = cache.rows(np.arange(len(cache)))
    assert (got_count == count.numpy()).all() and count.min() > 0
    np.testing.assert_array_equal(got, ref.numpy())
    # the dataset wrapper carries them with each item
    item = WithKeypoints(dm.train_set, cache)[3]
    assert item["keypoints"].shape == (32, 4) and int(item["keypoint_count"]) == int(count[3])
    assert WithKeypoints(dm.train_set, cache).classes == ["a", "b"]  # other attributes are the dataset's


def test_reuse_and_only_new_or_changed_files_detected(tmp_path, counting):
    write_folder(tmp_path / "data")
    cache = prepare(dataset(tmp_path / "data").train_set, tmp_path / "cache")
    before, _ = cache.rows(np.arange(12))
    counting.clear()
    again = prepare(dataset(tmp_path / "data").train_set, tmp_path / "cache")
    assert counting == [] and again.directory == cache.directory  # reused: nothing detected
    # one file changed (new content and mtime), one file added
    changed = tmp_path / "data" / "train" / "a" / "2.png"
    write_folder(tmp_path / "other", n_per_class=1, seed=5)
    os.replace(tmp_path / "other" / "train" / "a" / "0.png", changed)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.replace(tmp_path / "other" / "train" / "b" / "0.png", tmp_path / "data" / "train" / "b" / "9.png")
    ds = dataset(tmp_path / "data").train_set
    cache = prepare(ds, tmp_path / "cache")
    assert sum(counting) == 2 and len(cache) == 13
    after, count = cache.rows(np.arange(13))
    names = [os.path.relpath(p, tmp_path / "data" / "train") for p, _ in ds.samples]
    for i, name in enumerate(names):  # unchanged files keep their rows (at their new index)
        if name not in ("a/2.png", "b/9.png"):
            old = sorted(n for n in names if n != "b/9.png").index(name)
            np.testing.assert_array_equal(after[i], before[old])
    images = torch.stack([ds[names.index(n)]["image"] for n in ("a/2.png", "b/9.png")])
    ref, ref_count = pack_keypoints(detect_keypoints(DeviceTransform(SIZE).resize(images), **SIFT))
    np.testing.assert_array_equal(after[[names.index("a/2.png"), names.index("b/9.png")]], ref.numpy())


def test_other_settings_never_reuse_a_cache(tmp_path, counting):
    write_folder(tmp_path / "data")
    ds = dataset(tmp_path / "data").train_set
    a = prepare(ds, tmp_path / "cache")
    transform = DeviceTransform(32)
    b = FolderKeypointCache.prepare(ds, transform.resize, SIFT, transform.size, tmp_path / "cache", progress=False)
    c = FolderKeypointCache.prepare(ds, DeviceTransform(SIZE).resize, dict(SIFT, contrast_threshold=0.03),
                                    (SIZE, SIZE), tmp_path / "cache", progress=False)
    assert len({a.directory, b.directory, c.directory}) == 3 and sum(counting) == 36


@pytest.mark.parametrize("damage", ["truncate_keypoints", "garbage_meta", "drop_count"])
def test_corrupt_cache_file_is_named_and_rebuilt(tmp_path, counting, caplog, damage):
    write_folder(tmp_path / "data")
    ds = dataset(tmp_path / "data").train_set
    cache = prepare(ds, tmp_path / "cache")
    good, _ = cache.rows(np.arange(12))
    d = cache.directory
    if damage == "truncate_keypoints":
        os.truncate(d / "keypoints.npy", 1000)
        bad = "keypoints.npy"
    elif damage == "garbage_meta":
        (d / "meta.json").write_text("{not json")
        bad = "meta.json"
    else:
        (d / "count.npy").unlink()
        bad = "count.npy"
    counting.clear()
    with caplog.at_level(logging.WARNING):
        again = prepare(ds, tmp_path / "cache")
    assert any(bad in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert sum(counting) == 12
    np.testing.assert_array_equal(again.rows(np.arange(12))[0], good)


def test_interrupted_build_resumes_where_it_stopped(tmp_path, counting, monkeypatch):
    write_folder(tmp_path / "data")
    ds = dataset(tmp_path / "data").train_set
    real = folder_cache.detect_keypoints  # the fixture's counting detector
    calls = []

    def dies(x, **kw):  # the build is killed during its third batch
        calls.append(x.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(x, **kw)

    monkeypatch.setattr(folder_cache, "detect_keypoints", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare(ds, tmp_path / "cache")
    monkeypatch.setattr(folder_cache, "detect_keypoints", real)
    counting.clear()
    cache = prepare(ds, tmp_path / "cache")
    assert sum(counting) == 12 - sum(calls[:2])  # only the rows the killed build had not written
    assert (cache.rows(np.arange(12))[1] > 0).all()


def test_unreadable_image_is_stored_empty_and_counted(tmp_path, caplog):
    write_folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "a" / "broken.png").write_bytes(b"not an image")
    ds = dataset(tmp_path / "data").train_set
    with caplog.at_level(logging.INFO):
        cache = prepare(ds, tmp_path / "cache")
    i = [Path(p).name for p, _ in ds.samples].index("broken.png")
    assert cache.rows([i])[1][0] == 0 and (np.delete(cache.rows(np.arange(len(cache)))[1], i) > 0).all()
    assert any("1 unreadable files" in r.getMessage() for r in caplog.records)


def test_unwritable_cache_dir_falls_back_to_a_temporary_directory(tmp_path, caplog):
    write_folder(tmp_path / "data")
    (tmp_path / "a_file").write_text("")
    with caplog.at_level(logging.WARNING):
        cache = prepare(dataset(tmp_path / "data").train_set, tmp_path / "a_file" / "cache")
    assert any("cannot be written" in r.getMessage() for r in caplog.records)
    assert len(cache) == 12 and not str(cache.directory).startswith(str(tmp_path))



def _same_size_png(path: Path, seed: int, scratch: Path) -> None:
    """Overwrite ``path`` in place (as ``cp -p`` does) with a ``write_folder`` image of ``seed`` stored uncompressed
    (``compress_level=0``: the byte size depends on the dimensions only, so any two such images have equal sizes)."""
    from PIL import Image

    write_folder(scratch / str(seed), n_per_class=1, seed=seed)
    with Image.open(scratch / str(seed) / "train" / "a" / "0.png") as im:
        im.save(path, compress_level=0)


def test_same_size_replacement_with_mtime_kept_is_detected(tmp_path, counting):
    root = tmp_path / "data"
    write_folder(root, n_per_class=2)
    target = root / "train" / "a" / "1.png"
    _same_size_png(target, 3, tmp_path / "other")  # the folder's file is stored uncompressed too
    ds = dataset(root).train_set
    before, _ = prepare(ds, tmp_path / "cache").rows(np.arange(len(ds)))
    st = target.stat()
    _same_size_png(target, 4, tmp_path / "other")  # another image, same byte size, mtime restored (cp -p, tar)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    counting.clear()
    ds = dataset(root).train_set
    after, count = prepare(ds, tmp_path / "cache").rows(np.arange(len(ds)))
    i = [Path(p) for p, _ in ds.samples].index(target)
    assert sum(counting) == 1  # that row only
    ref, ref_count = pack_keypoints(detect_keypoints(DeviceTransform(SIZE).resize(ds[i]["image"][None]), **SIFT))
    assert not np.array_equal(ref.numpy()[0], before[i])  # the new image's keypoints differ from the old one's
    np.testing.assert_array_equal(after[i], ref.numpy()[0])
    assert count[i] == int(ref_count[0])
    np.testing.assert_array_equal(np.delete(after, i, 0), np.delete(before, i, 0))


@pytest.mark.parametrize("verify, detected", [("stat", 0), ("content", 1)])
def test_verify_modes_on_a_file_system_whose_stat_never_changes(tmp_path, counting, monkeypatch, verify, detected):
    """A file system that keeps no ctime (nor mtime, here): "stat" misses a same-size replacement, "content"
    catches it."""
    root = tmp_path / "data"
    write_folder(root, n_per_class=2)
    target = root / "train" / "a" / "1.png"
    _same_size_png(target, 3, tmp_path / "other")
    ds = dataset(root).train_set
    with pytest.raises(ValueError, match="verify"):
        prepare(ds, tmp_path / "cache", verify="mtime")
    frozen: dict = {}
    real = folder_cache._stat
    monkeypatch.setattr(folder_cache, "_stat", lambda p: frozen.setdefault(p, real(p)))
    monkeypatch.setattr(folder_cache, "_RACY_NS", -10**18)  # no file counts as just changed
    prepare(ds, tmp_path / "cache")
    _same_size_png(target, 4, tmp_path / "other")
    counting.clear()
    prepare(dataset(root).train_set, tmp_path / "cache", verify=verify)
    assert sum(counting) == detected

def _snapshot(directory: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.fixture
def read_only(monkeypatch):
    """Makes a cache directory read-only: mode 0o555, its files 0o444 (what a non-root process meets on a read-only
    mount) and, as root ignores modes, the cache's write probe answering EROFS as a read-only mount does. The tests
    then compare a snapshot of the directory (names, bytes, mtimes) before and after: nothing written, as root too.
    Modes are restored at teardown."""
    made: list[Path] = []
    real = folder_cache._probe

    def probe(directory: Path):
        if directory in made:
            return OSError(30, "Read-only file system", str(directory))
        return real(directory)

    monkeypatch.setattr(folder_cache, "_probe", probe)

    def make(directory: Path) -> dict:
        for p in directory.iterdir():
            p.chmod(0o444)
        directory.chmod(0o555)
        made.append(directory)
        return _snapshot(directory)

    yield make
    for d in made:
        d.chmod(0o755)
        for p in d.iterdir():
            p.chmod(0o644)


def test_complete_cache_on_a_read_only_directory_is_used_as_it_is(tmp_path, counting, read_only, caplog):
    write_folder(tmp_path / "data", n_per_class=2)
    ds = dataset(tmp_path / "data").train_set
    cache = prepare(ds, tmp_path / "cache")
    good, good_count = cache.rows(np.arange(len(ds)))
    snapshot = read_only(cache.directory)
    counting.clear()
    with caplog.at_level(logging.WARNING):
        again = prepare(dataset(tmp_path / "data").train_set, tmp_path / "cache")
    assert counting == [] and again.directory == cache.directory  # used in place, nothing detected
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    kp, count = again.rows(np.arange(len(ds)))
    np.testing.assert_array_equal(kp, good)
    np.testing.assert_array_equal(count, good_count)
    assert not again._kp.flags.writeable  # memory-mapped read-only
    assert _snapshot(cache.directory) == snapshot  # no lock file, probe or rewrite


def test_incomplete_cache_on_a_read_only_directory_falls_back_to_a_temporary_one(tmp_path, counting, read_only,
                                                                                 caplog):
    write_folder(tmp_path / "data", n_per_class=2)
    ds = dataset(tmp_path / "data").train_set
    cache = prepare(ds, tmp_path / "cache")
    good, _ = cache.rows(np.arange(len(ds)))
    count = np.load(cache.directory / "count.npy", mmap_mode="r+")
    count[1] = -1  # an interrupted build: row 1 not detected yet
    count.flush()
    del count
    snapshot = read_only(cache.directory)
    counting.clear()
    with caplog.at_level(logging.WARNING):
        again = prepare(dataset(tmp_path / "data").train_set, tmp_path / "cache")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "cannot be written" in warned[0] and "incomplete" in warned[0]
    assert not str(again.directory).startswith(str(tmp_path))
    assert sum(counting) == 1  # the rows the read-only cache holds are copied over, the missing one detected
    np.testing.assert_array_equal(again.rows(np.arange(len(ds)))[0], good)
    assert _snapshot(cache.directory) == snapshot

def _ddp_worker(rank: int, world: int, init_file: str, root: str, cache_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        seen = []
        real = folder_cache.detect_keypoints
        folder_cache.detect_keypoints = lambda x, **kw: (seen.append(x.shape[0]), real(x, **kw))[1]
        cache = prepare(dataset(Path(root)).train_set, cache_dir)
        kp, count = cache.rows(np.arange(len(cache)))
        np.savez(f"{out}.{rank}.npz", kp=kp, count=count, seen=np.array([sum(seen)]))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_share_the_build(tmp_path):
    write_folder(tmp_path / "data")
    single = prepare(dataset(tmp_path / "data").train_set, tmp_path / "single")
    ref_kp, ref_count = single.rows(np.arange(len(single)))
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "data"), str(tmp_path / "ddp"),
                                          str(tmp_path / "out")), nprocs=2, join=True, start_method="fork")
    results = [np.load(tmp_path / f"out.{r}.npz") for r in range(2)]
    assert [int(r["seen"][0]) for r in results] == [6, 6]  # each rank detected half of the 12 files
    for r in results:  # and every rank reads the whole cache, equal to a single process's
        np.testing.assert_array_equal(r["kp"], ref_kp)
        np.testing.assert_array_equal(r["count"], ref_count)


def test_training_on_an_image_folder_uses_the_cache_by_default(tmp_path, tiny_cfg):
    from siftguide.train import train

    write_folder(tmp_path / "data")
    cfg = tiny_cfg(["data=image_folder", f"data.root={tmp_path / 'data'}", "data.num_workers=0", "model.in_chans=1",
                    "model.img_size=32", "transform=grey", "num_classes=2", "data.batch_size=4",
                    "callbacks.knn=null", "guidance=prior"], name="folder", fashion_mnist=False)
    assert cfg.relevance.cache == "auto"
    train(cfg)
    caches = list((tmp_path / "keypoint_cache").glob("folder-*"))
    assert len(caches) == 2  # train and val folders
    import pandas as pd

    m = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
    assert m["val/acc"].notna().any() and (m["train/no_keypoint_frac"].dropna() < 1).all()
