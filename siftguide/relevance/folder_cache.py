"""On-disk keypoint cache for datasets of files (image folders): detect once, stream the keypoints with the batches.

The image-folder path is what GPU users take, and on the fly SIFT costs a GPU step 1.5-2.4x a baseline step
(issue 21). This cache detects the keypoints of every file once, on the image as the loader delivers it (the
resized centre crop, resized to the model's size like the device pipeline does, before augmentation), and stores
them in memory-mapped arrays. Loader workers read each sample's row with the image (:class:`WithKeypoints`), so the
keypoints reach the device with the batch and are mapped through the batch's augmentation matrix like the in-memory
cache's: the per-step cost is a row read in the workers and a 3x3 transform on the device. Nothing is ever held in
memory as a whole: the build streams through a loader, the lookups read rows.

A cache directory ``<cache_dir>/folder-<key>/`` (key: the folder's absolute path, the loader's and the model's image
size, the channels and the detector settings, so another setting or size never reuses it) holds:

| file | content |
|---|---|
| ``keypoints.npy`` | ``(N, K, 4)`` float16: x, y, scale, response of each file's strongest ``K = max_keypoints`` keypoints |
| ``count.npy`` | ``(N,)`` int16: valid keypoints per file; -1 while not detected yet (a build resumes there) |
| ``files.txt``, ``stat.npy`` | each row's file: path relative to the folder, and (size, mtime_ns) |
| ``meta.json`` | settings, N, version; written last |

Each run checks the files against the folder: a file added, removed or changed (size or modification time) is
detected again, not the whole set; the rows of unchanged files are reused. An unreadable image is counted and
stored empty (relevance falls back to uniform for it, as on the fly). A truncated or corrupt cache file is named in
a warning and the cache rebuilt. A cache directory that cannot be written falls back, with a warning, to a
temporary directory removed at exit. One run builds at a time (a lock file): a concurrent run waits, then reuses.

Distributed: every rank calls :meth:`FolderKeypointCache.prepare`; rank 0 checks and lays out the arrays, each rank
detects its share of the missing rows into the shared arrays (so ``cache_dir`` must be on a file system all ranks
see, as for a single node), and all ranks then read the whole cache.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from .cache import pack_keypoints
from .detector import detect_keypoints

log = logging.getLogger(__name__)

__all__ = ["FolderKeypointCache", "WithKeypoints", "supports_folder_cache"]

_VERSION = 1  # bump whenever the detector's output or the file layout changes
_FILES = ("keypoints.npy", "count.npy", "files.txt", "stat.npy", "meta.json")


def supports_folder_cache(dataset) -> bool:
    """A dataset of files: ``samples`` = ``[(path, label), ...]`` in index order (torchvision's ``ImageFolder``,
    :class:`~siftguide.data.ImageFolderDataModule`'s sets), items carrying their ``index``."""
    samples = getattr(dataset, "samples", None)
    return isinstance(samples, (list, tuple)) and len(samples) > 0 and isinstance(samples[0][0], (str, os.PathLike))


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        dist.barrier()


def _identity(paths: list[str], root: str) -> tuple[list[str], np.ndarray]:
    """Relative paths and ``(N, 2)`` int64 (size, mtime_ns) of the files (stat in threads: network file systems)."""
    def stat(p):
        try:
            st = os.stat(p)
            return st.st_size, st.st_mtime_ns
        except OSError:
            return -1, -1

    with ThreadPoolExecutor(16) as pool:
        stats = list(pool.map(stat, paths, chunksize=256))
    return [os.path.relpath(p, root) for p in paths], np.asarray(stats, dtype=np.int64).reshape(-1, 2)


@contextlib.contextmanager
def _locked(directory: Path):
    """Exclusive lock on ``directory/.lock`` (waits for a concurrent build; released at exit or crash)."""
    with open(directory / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("keypoint cache %s: another run is building it, waiting", directory)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class FolderKeypointCache:
    """A prepared cache directory; :meth:`rows` reads keypoints by dataset index (memory-mapped, opened lazily in
    each process, so loader workers receive only the path)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        self.n, self.max_keypoints = int(meta["n"]), int(meta["max_keypoints"])
        self._kp: np.ndarray | None = None
        self._count: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_kp": None, "_count": None}

    def _open(self) -> None:
        if self._kp is None:
            self._kp = np.load(self.directory / "keypoints.npy", mmap_mode="r")
            self._count = np.load(self.directory / "count.npy", mmap_mode="r")

    def rows(self, index) -> tuple[np.ndarray, np.ndarray]:
        """``(n, K, 4)`` float16 and ``(n,)`` int16 (missing rows, -1, read as empty)."""
        self._open()
        return np.array(self._kp[index]), np.maximum(np.array(self._count[index]), 0)  # copies, writable

    def disk_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in _FILES if (self.directory / f).exists())

    # ---------------------------------------------------------------------------------------------- building
    @staticmethod
    def key(root: str, item_size, image_size: tuple[int, int], channels, sift: dict) -> str:
        spec = {"root": os.path.abspath(root), "item_size": item_size, "size": list(image_size),
                "channels": channels, "sift": sift, "v": _VERSION}
        return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    @torch.no_grad()
    def prepare(cls, dataset: Dataset, prepare, sift: dict, image_size: tuple[int, int], cache_dir: str | Path,
                device: torch.device | str = "cpu", batch_size: int = 256, num_workers: int = 0,
                progress: bool = True) -> "FolderKeypointCache":
        """The cache of ``dataset`` (see :func:`supports_folder_cache`), checked against the folder and completed:
        rows of new or changed files detected with ``prepare`` (the deterministic resize of the device pipeline)
        and :func:`detect_keypoints` on ``device``. Every rank of a process group must call it."""
        paths = [str(p) for p, _ in dataset.samples]
        root = getattr(dataset, "root", None) or os.path.commonpath([os.path.dirname(p) for p in paths])
        k = int(sift.get("max_keypoints", 512))
        key = cls.key(root, getattr(dataset, "size", None), image_size, getattr(dataset, "channels", None), sift)
        rank, world = _dist()
        directory = _writable(Path(cache_dir) / f"folder-{key}") if rank == 0 else None
        if world > 1:
            box = [str(directory) if directory else None]
            dist.broadcast_object_list(box, src=0)
            directory = Path(box[0])
        t0 = time.perf_counter()
        # rank 0 holds the lock for the whole build: a concurrent run waits, then reuses the finished cache
        with _locked(directory) if rank == 0 else contextlib.nullcontext():
            todo = _layout(directory, paths, root, k, sift, image_size) if rank == 0 else None
            if world > 1:  # every rank detects its share of the missing rows into the shared arrays
                box = [todo]
                dist.broadcast_object_list(box, src=0)
                todo = np.array_split(box[0], world)[rank]
            _detect_rows(directory, dataset, todo, prepare, sift, device, batch_size, num_workers,
                         progress and rank == 0)
            _barrier()
        cache = cls(directory)
        if rank == 0:
            log.info("keypoint cache %s: %d files ready in %.1f s (%.1f MB on disk)", directory, len(cache),
                     time.perf_counter() - t0, cache.disk_bytes() / 1e6)
        return cache


def _writable(directory: Path) -> Path:
    """``directory``, created; or a temporary directory (removed at exit) with a warning when it cannot be
    written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return directory
    except OSError as e:
        tmp = Path(tempfile.mkdtemp(prefix="siftguide-keypoints-"))
        atexit.register(shutil.rmtree, tmp, True)
        log.warning("keypoint cache directory %s cannot be written (%s): this run keeps its keypoints in %s, removed "
                    "at exit; set relevance.cache_dir to a writable directory to keep them between runs",
                    directory, e, tmp)
        return tmp


def _read_index(directory: Path, k: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(files, stat, count) of a complete, consistent cache in ``directory``; None when there is none. A cache
    that is there but unreadable or inconsistent is named in a warning and removed."""
    if not (directory / "meta.json").exists():
        return None
    name = "meta.json"
    try:
        meta = json.loads((directory / name).read_text())
        n = int(meta["n"])
        name = "files.txt"
        files = (directory / name).read_text().split("\n") if n else []
        name = "stat.npy"
        stat = np.load(directory / name)
        name = "count.npy"
        count = np.load(directory / name)
        name = "keypoints.npy"
        kp = np.load(directory / name, mmap_mode="r")  # checks the header against the file's size
        name = "meta.json"
        if meta.get("version") != _VERSION or int(meta["max_keypoints"]) != k:
            raise ValueError(f"version {meta.get('version')} / max_keypoints {meta['max_keypoints']} differ")
        if not (len(files) == len(stat) == len(count) == len(kp) == n) or kp.shape[1:] != (k, 4):
            name = "keypoints.npy, count.npy, stat.npy, files.txt"
            raise ValueError(f"arrays of different lengths ({len(kp)}, {len(count)}, {len(stat)}, {len(files)}; "
                             f"meta.json says {n})")
        return files, stat, count
    except Exception as e:  # noqa: BLE001 - truncated npy, bad json, missing file: all mean "start again"
        log.warning("keypoint cache file %s is unreadable or corrupt (%s: %s): rebuilding the cache in %s",
                    directory / name if "," not in name else name, type(e).__name__, str(e)[:200], directory)
        for f in _FILES:
            (directory / f).unlink(missing_ok=True)
        return None


def _replace(directory: Path, name: str, write) -> None:
    """Write ``directory/name`` through a temporary file (``write(binary file)``) and an atomic rename."""
    tmp = directory / f".{name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, directory / name)


def _layout(directory: Path, paths: list[str], root: str, k: int, sift: dict, image_size) -> np.ndarray:
    """Make the arrays in ``directory`` match ``paths`` (rows of unchanged files kept, others marked missing);
    returns the indices of the rows still to detect."""
    files, stat = _identity(paths, root)
    n = len(files)
    old = _read_index(directory, k)
    if old is not None and old[0] == files:  # same files in the same order: mark the changed ones, in place
        changed = np.flatnonzero((old[1] != stat).any(1))
        if len(changed):
            count = np.load(directory / "count.npy", mmap_mode="r+")
            count[changed] = -1
            count.flush()
            del count
            _replace(directory, "stat.npy", lambda p: np.save(p, stat))
            log.info("keypoint cache %s: %d changed files to detect again", directory, len(changed))
    else:  # first build, or files added/removed: new arrays, rows of unchanged files copied over
        (directory / "meta.json").unlink(missing_ok=True)  # incomplete until meta.json is written again
        kp = np.lib.format.open_memmap(directory / f".keypoints.npy.tmp{os.getpid()}", mode="w+",
                                       dtype=np.float16, shape=(n, k, 4))
        count = np.full(n, -1, dtype=np.int16)
        if old is not None:
            pos = {f: i for i, f in enumerate(old[0])}
            pairs = np.array([(i, pos[f]) for i, f in enumerate(files) if f in pos], dtype=np.int64).reshape(-1, 2)
            same = (old[1][pairs[:, 1]] == stat[pairs[:, 0]]).all(1) & (old[2][pairs[:, 1]] >= 0)
            pairs = pairs[same]
            src = np.load(directory / "keypoints.npy", mmap_mode="r")
            for lo in range(0, len(pairs), 65536):  # chunked copy: never the whole array in memory
                p = pairs[lo : lo + 65536]
                kp[p[:, 0]] = src[p[:, 1]]
                count[p[:, 0]] = old[2][p[:, 1]]
            del src
            log.info("keypoint cache %s: %d of %d files unchanged, %d to detect", directory, len(pairs), n,
                     n - len(pairs))
        kp.flush()
        del kp
        os.replace(directory / f".keypoints.npy.tmp{os.getpid()}", directory / "keypoints.npy")
        _replace(directory, "count.npy", lambda p: np.save(p, count))
        _replace(directory, "stat.npy", lambda p: np.save(p, stat))
        _replace(directory, "files.txt", lambda f: f.write("\n".join(files).encode()))
        meta = {"version": _VERSION, "n": n, "max_keypoints": k, "sift": sift, "size": list(image_size),
                "root": os.path.abspath(root)}
        _replace(directory, "meta.json", lambda f: f.write(json.dumps(meta, indent=1, default=str).encode()))
    return np.flatnonzero(np.load(directory / "count.npy") < 0)


def _detect_rows(directory: Path, dataset: Dataset, rows: np.ndarray, prepare, sift: dict, device, batch_size: int,
                 num_workers: int, progress: bool) -> None:
    """Detect the keypoints of ``dataset[rows]`` in batches and write them into the memory-mapped arrays, flushing
    as it goes (an interrupted build resumes at the rows still marked -1)."""
    if len(rows) == 0:
        return
    kp_out = np.load(directory / "keypoints.npy", mmap_mode="r+")
    count_out = np.load(directory / "count.npy", mmap_mode="r+")
    loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=default_collate, pin_memory=torch.device(device).type == "cuda")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="keypoint cache", unit="img", dynamic_ncols=True, smoothing=0.1)
    t0, done, bad = time.perf_counter(), 0, 0
    for i, batch in enumerate(loader):
        x = prepare(batch["image"].to(device, non_blocking=True))
        packed, count = pack_keypoints(detect_keypoints(x, **sift))
        idx = batch["index"].numpy()
        kp_out[idx] = packed.cpu().numpy()
        count_out[idx] = count.cpu().numpy()
        if "valid" in batch:
            bad += int((~batch["valid"]).sum())
        done += len(idx)
        if bar is not None:
            bar.update(len(idx))
        if i % 50 == 49:
            kp_out.flush()
            count_out.flush()
    kp_out.flush()
    count_out.flush()
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    log.info("keypoint cache %s: detected %d images in %.1f s (%.0f img/s)%s", directory, done, dt,
             done / max(dt, 1e-9), f"; {bad} unreadable files stored empty (named above)" if bad else "")


class WithKeypoints(Dataset):
    """``dataset`` whose items also carry ``keypoints`` ``(K, 4)`` float16 and ``keypoint_count`` (int16) from a
    :class:`FolderKeypointCache` (read in the loader workers). Other attributes are the wrapped dataset's."""

    def __init__(self, dataset: Dataset, cache: FolderKeypointCache) -> None:
        if len(dataset) != len(cache):
            raise ValueError(f"keypoint cache holds {len(cache)} rows for a dataset of {len(dataset)} items")
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        kp, count = self.cache.rows(int(item.get("index", i)))
        item["keypoints"] = torch.from_numpy(kp)
        item["keypoint_count"] = torch.tensor(int(count), dtype=torch.int16)
        return item

    def __getattr__(self, name: str):
        if name in ("dataset", "cache"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
