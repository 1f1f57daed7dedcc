"""On-disk keypoint cache for datasets of files (image folders): each file's keypoints detected once, read by row.

Each file's keypoints are detected on the image as the loader delivers it (the dataset's decode, resize and centre
crop, then ``prepare``: the device pipeline's deterministic resize to the model's size, before augmentation) and
stored in memory-mapped arrays. Loader workers read each sample's row with the image (:class:`WithKeypoints`), so
the keypoints reach the device with the batch, in the coordinates of the un-augmented image; the device maps them
through the batch's augmentation matrix. No array is ever held in memory as a whole: the build streams through a
loader, lookups copy rows.

Layout: a cache directory ``<cache_dir>/folder-<key>/``, ``key`` a hash of the folder's absolute path, the dataset's
and the model's image size, the channels, the detector settings and ``_VERSION`` (any other setting gets another
directory). ``N`` files in the dataset's order, ``K = max_keypoints``:

| file | content |
|---|---|
| ``keypoints.npy`` | ``(N, K, 4)`` float16: x, y, scale (sigma), response of each file's strongest keypoints, in |
| | pixels of the prepared image; valid keypoints first, zeros after |
| ``count.npy`` | ``(N,)`` int16: valid keypoints per row; -1 while the row is not detected (a build resumes there) |
| ``files.txt`` | ``N`` lines: each row's file, its path relative to the folder |
| ``stat.npy`` | ``(N, 3)`` int64: each row's file's size (bytes), mtime, ctime (ns) at its last check; -1: no stat; |
| | ctime -2: changed within ``_RACY_NS`` of that check, hashed at the next one |
| ``hash.npy`` | ``(N,)`` uint64: BLAKE2b, 8-byte digest read little-endian, of each row's file's bytes; 0: unknown |
| ``meta.json`` | version, ``N``, ``K``, detector settings, image size, folder; written last (none: incomplete) |
| ``.lock`` | locked by the run that checks or builds the cache (never created where the run cannot write) |

Whole files are written under a temporary name and renamed into place. A build writes each batch's rows into the
memory-mapped ``keypoints.npy``, ``hash.npy`` and ``count.npy``, count last, and flushes every 50 batches: a killed
build resumes at the rows still -1.

Every run checks the cache against the folder and detects only the rows of new or changed files; the rows of other
files are reused (moved to their file's new index when files were added or removed). ``verify`` picks the check:

- ``"auto"`` (default): a row is reused when its file's (size, mtime, ctime) equal the stored ones. A file whose
  size is the same but whose mtime or ctime differ is read and hashed: same hash, reused (its stat is updated);
  other hash, detected again. ctime changes with every write to a file and cannot be set back (``os.utime`` sets
  it to the current time), so a replacement by a same-size file with its mtime restored (``cp -p``, ``rsync -a``,
  an archive extracted with its mtimes) is caught without reading the unchanged files: the check costs one
  ``stat`` per file. It misses a same-size, same-mtime replacement only on a file system that does not keep ctime
  (some FUSE and object-store mounts report a fixed one), or when ctime itself was forged (system clock set back,
  raw disk edits); use ``"content"`` there. ``chmod``/``chown``/hard links also change ctime: the next run hashes
  those files once and keeps their rows. A file changed within ``_RACY_NS`` (2 s) of a check could change again
  within the same timestamp tick: it is hashed at the next check as well.
- ``"content"``: every file is read and hashed each run; a row is reused when its file's hash equals the stored
  one, whatever its stat. Catches any change on any file system; costs a read of the whole folder per run.
  Measured (``bench/folder_cache_verify.py``, 60,000 PNGs of 4 kB, 2 shared cores): the check of a complete cache
  takes 0.39 s with ``"auto"``, 2.1 s with ``"content"`` (page cache warm), and the hash pass alone 8.9 s with the
  file data cold on a local disk, hence not the default.
- ``"stat"``: (size, mtime) only, no file is read (a same-size replacement with its mtime kept is missed). The
  stored ctime of reused rows is left as it was, so a later ``"auto"`` run still checks those files.

A file's hash is computed where the build reads it anyway (in the loader workers, right before the decode), so the
first build reads the folder once. An unreadable image is stored empty (count 0; relevance falls back to uniform for
it, as on the fly) and counted. A truncated or corrupt cache file is named in a warning and the cache rebuilt.

Read-only caches: a cache directory that cannot be written (read-only mount, another user's) is used in place,
read-only (no lock file, memmaps opened with ``mode="r"``), when it holds a complete cache whose rows all pass the
check. Otherwise (absent, incomplete or stale) this run builds in a temporary directory removed at exit, seeded with
the read-only cache's valid rows, and says so in a warning. One run builds a directory at a time (``.lock``): a
concurrent run waits, then reuses.

Distributed: every rank calls :meth:`FolderKeypointCache.prepare`; rank 0 checks the folder, picks the directory and
lays out the arrays and broadcasts the directory and the rows to detect; each rank detects its share of those rows
into the shared arrays (so ``cache_dir`` must be on a file system all ranks see, as for a single node), and all
ranks then read the whole cache.
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
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, default_collate

from .cache import pack_keypoints
from .progress import BuildProgress
from .detector import detect_keypoints

log = logging.getLogger(__name__)

__all__ = ["FolderKeypointCache", "WithKeypoints", "supports_folder_cache", "VERIFY"]

_VERSION = 2  # bump whenever the detector's output or the file layout changes
_FILES = ("keypoints.npy", "count.npy", "files.txt", "stat.npy", "hash.npy", "meta.json")
VERIFY = ("auto", "content", "stat")  # values of ``verify`` (module docstring)
_THREADS = 16  # stat and hash threads where the file system makes them wait (network file systems, cold disks)
_PROBE_FILES, _SLOW_CALL_S = 256, 50e-6  # files timed serially first; the time per file above which threads are used
_RACY_NS = 2 * 10**9  # a file changed this close to its check may change again with the same timestamps
_PROGRESS_EVERY_S = 60.0  # progress lines of a build when stderr is not a terminal (no progress bar)


def supports_folder_cache(dataset) -> bool:
    """A dataset of files: ``samples`` = ``[(path, label), ...]`` in index order (torchvision's ``ImageFolder``,
    :class:`~siftguide.data.ImageFolderDataModule`'s sets), items carrying their ``index``."""
    samples = getattr(dataset, "samples", None)
    return isinstance(samples, (list, tuple)) and len(samples) > 0 and isinstance(samples[0][0], (str, os.PathLike))


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _map(fn, items: list) -> list:
    """``[fn(x) for x in items]``: serially while the calls are fast (a local file system with its caches warm,
    where threads only add GIL hand-offs: a stat pass 4-6x slower on 2 cores), in ``_THREADS`` threads once the first
    ``_PROBE_FILES`` calls show I/O waits (network file systems, cold disks)."""
    t0 = time.perf_counter()
    out = [fn(x) for x in items[:_PROBE_FILES]]
    if len(items) <= _PROBE_FILES or (time.perf_counter() - t0) / _PROBE_FILES < _SLOW_CALL_S:
        return out + [fn(x) for x in items[_PROBE_FILES:]]
    with ThreadPoolExecutor(_THREADS) as pool:
        return out + list(pool.map(fn, items[_PROBE_FILES:], chunksize=64))


def _stat(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns
    except OSError:
        return -1, -1, -1


def _relative(paths: list[str], root: str) -> list[str]:
    """``os.path.relpath(p, root)`` of each path; a prefix cut where that gives the same (paths joined onto
    ``root``: relpath costs about 6 us a path)."""
    prefix = os.path.join(root, "")
    cut, fast = len(prefix), os.sep == "/"
    return [p[cut:] if fast and p.startswith(prefix) and "/." not in p[cut - 1:] and "//" not in p[cut - 1:]
            else os.path.relpath(p, root) for p in paths]


def _identity(paths: list[str], root: str) -> tuple[list[str], np.ndarray, int]:
    """Relative paths and ``(N, 3)`` int64 (size, mtime_ns, ctime_ns) of the files, -1 for a file that cannot be
    stat'ed; and the wall-clock time (ns) the check started."""
    started = time.time_ns()
    stats = _map(_stat, paths)
    return _relative(paths, root), np.asarray(stats, dtype=np.int64).reshape(-1, 3), started


def _hash_file(path: str) -> int:
    """BLAKE2b of the file's bytes, 8-byte digest read as a little-endian uint64 (0 is mapped to 1); 0 when the file
    cannot be read."""
    h = hashlib.blake2b(digest_size=8)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return 0
    return int.from_bytes(h.digest(), "little") or 1


def _hash_files(paths: list[str]) -> np.ndarray:
    """``(N,)`` uint64 :func:`_hash_file` of each path."""
    return np.asarray(_map(_hash_file, paths), dtype=np.uint64).reshape(-1)


def _probe(directory: Path) -> OSError | None:
    """None when ``directory`` can be created and written (a probe file is written and removed); else the error."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return None
    except OSError as e:
        return e


@contextlib.contextmanager
def _locked(directory: Path, shared: bool = False):
    """Exclusive lock on ``directory/.lock`` (waits for a concurrent build; released at exit or crash). ``shared``:
    a shared lock on an existing ``.lock`` opened read-only (a directory this run cannot write: waits for a build
    by a run that can); no lock when there is no such file."""
    try:
        f = open(directory / ".lock", "r" if shared else "a+")
    except OSError:
        if not shared:
            raise
        f = None
    with f if f is not None else contextlib.nullcontext():
        if f is None:
            yield
            return
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("keypoint cache %s: another run is building it, waiting", directory)
            fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class FolderKeypointCache:
    """A prepared cache directory; :meth:`rows` reads keypoints by dataset index (memory-mapped read-only, opened
    lazily in each process, so loader workers receive only the path)."""

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
        """``(n, K, 4)`` float16 and ``(n,)`` int16 copies (writable) of rows ``index``; a row not detected (-1)
        reads as empty (count 0)."""
        self._open()
        return np.array(self._kp[index]), np.maximum(np.array(self._count[index]), 0)

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
                progress: bool = True, verify: str = "auto") -> "FolderKeypointCache":
        """The cache of ``dataset`` (see :func:`supports_folder_cache`) in ``cache_dir``, checked against the folder
        (``verify``: ``"auto"``, ``"content"`` or ``"stat"``, see the module docstring) and completed: rows of new
        or changed files detected with ``prepare`` (the deterministic resize of the device pipeline) and
        :func:`detect_keypoints` on ``device``, ``batch_size`` images per call, files decoded by ``num_workers``
        loader workers. ``progress``: a progress bar on a terminal, a line every minute otherwise. Every rank of a
        process group must call it."""
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {', '.join(VERIFY)}; got {verify!r}")
        paths = [str(p) for p, _ in dataset.samples]
        root = getattr(dataset, "root", None) or os.path.commonpath(sorted({os.path.dirname(p) for p in paths}))
        k = int(sift.get("max_keypoints", 512))
        key = cls.key(root, getattr(dataset, "size", None), image_size, getattr(dataset, "channels", None), sift)
        rank, world = _dist()
        t0 = time.perf_counter()
        with contextlib.ExitStack() as held:  # rank 0 holds the lock until every rank has detected its rows
            if rank == 0:
                directory, todo, note = _open_dir(Path(cache_dir) / f"folder-{key}", held, paths, root, k, sift,
                                                  image_size, verify)
            if world > 1:
                box = [(str(directory), todo) if rank == 0 else None]
                dist.broadcast_object_list(box, src=0)
                directory, todo = Path(box[0][0]), box[0][1]
            total = len(todo)
            done, bad, dt = _detect_rows(directory, dataset, np.array_split(todo, world)[rank], prepare, sift,
                                         device, batch_size, num_workers, progress and rank == 0)
            if world > 1:  # also the barrier: every rank's rows are written
                counts = [None] * world
                dist.all_gather_object(counts, (done, bad))
                bad = sum(b for _, b in counts)
        cache = cls(directory)
        if rank == 0:
            detected = ""
            if total:
                detected = f"; {total} detected at {total / max(dt, 1e-9):.0f} img/s"
                detected += f" on {world} ranks" if world > 1 else ""
                detected += f", {bad} unreadable files stored empty (named above)" if bad else ""
            log.info("keypoint cache %s: %d files ready in %.1f s (%s%s; %.1f MB on disk)", directory, len(cache),
                     time.perf_counter() - t0, note, detected, cache.disk_bytes() / 1e6)
        return cache


class _Index(NamedTuple):
    """A complete, consistent cache's index: ``files`` (N relative paths), ``stat`` (N, 3) int64, ``hash`` (N,)
    uint64, ``count`` (N,) int16."""
    files: list[str]
    stat: np.ndarray
    hash: np.ndarray
    count: np.ndarray


def _open_dir(target: Path, held: contextlib.ExitStack, paths: list[str], root: str, k: int, sift: dict,
              image_size, verify: str) -> tuple[Path, np.ndarray, str]:
    """Rank 0: the directory this run uses, the rows still to detect in it, and a note on the check for the log.
    ``target`` when it can be written (locked on ``held``) or, read-only, when its cache is complete and passes the
    check; else a temporary directory (removed at exit) seeded with ``target``'s valid rows, with a warning."""
    error = _probe(target)
    if error is None:
        held.enter_context(_locked(target))
        files, stat, started = _identity(paths, root)
        old = _read_index(target, k)
        checked = _check(old, files, stat, started, paths, verify)
        return (target, *_layout(target, target, files, root, k, sift, image_size, old, checked))
    files, stat, started = _identity(paths, root)
    with _locked(target, shared=True) if target.is_dir() else contextlib.nullcontext():
        old = _read_index(target, k, writable=False) if target.is_dir() else None
        src, new_stat, new_hash, note = _check(old, files, stat, started, paths, verify)
    if old is not None and old.files == files and (src == np.arange(len(files))).all():
        return target, np.zeros(0, dtype=np.int64), f"{note}; read-only: {error.strerror or error}"
    state = ("absent or unreadable" if old is None else
             f"incomplete or stale: {int((src < 0).sum())} of {len(files)} files to detect")
    tmp = Path(tempfile.mkdtemp(prefix="siftguide-keypoints-"))
    atexit.register(shutil.rmtree, tmp, True)
    log.warning("keypoint cache directory %s cannot be written (%s) and its cache is %s: this run keeps its "
                "keypoints in %s, removed at exit; set relevance.cache_dir to a writable directory to keep them "
                "between runs", target, error, state, tmp)
    return (tmp, *_layout(tmp, target, files, root, k, sift, image_size, old, (src, new_stat, new_hash, note)))


def _read_index(directory: Path, k: int, writable: bool = True) -> _Index | None:
    """The index of a complete, consistent cache in ``directory``; None when there is none. A cache that is there but
    unreadable or inconsistent is named in a warning and, when ``writable``, removed."""
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
        name = "hash.npy"
        hashes = np.load(directory / name)
        name = "count.npy"
        count = np.load(directory / name)
        name = "keypoints.npy"
        kp = np.load(directory / name, mmap_mode="r")  # checks the header against the file's size
        name = "meta.json"
        if meta.get("version") != _VERSION or int(meta["max_keypoints"]) != k:
            raise ValueError(f"version {meta.get('version')} / max_keypoints {meta['max_keypoints']} differ")
        if not (len(files) == len(stat) == len(hashes) == len(count) == len(kp) == n) or kp.shape[1:] != (k, 4) \
                or stat.shape[1:] != (3,) or hashes.dtype != np.uint64:
            name = "keypoints.npy, count.npy, stat.npy, hash.npy, files.txt"
            raise ValueError(f"arrays of different lengths or shapes ({kp.shape}, {count.shape}, {stat.shape}, "
                             f"{hashes.shape} {hashes.dtype}, {len(files)}; meta.json says {n})")
        return _Index(files, stat, hashes, count)
    except Exception as e:  # noqa: BLE001 - truncated npy, bad json, missing file: all mean "start again"
        log.warning("keypoint cache file %s is unreadable or corrupt (%s: %s): %s", directory / name
                    if "," not in name else name, type(e).__name__, str(e)[:200],
                    f"rebuilding the cache in {directory}" if writable else "not using it")
        if writable:
            for f in _FILES:
                (directory / f).unlink(missing_ok=True)
        return None


def _check(old: _Index | None, files: list[str], stat: np.ndarray, started: int, paths: list[str],
           verify: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Which old row each file's keypoints can be taken from: ``(N,)`` int64 (-1: detect), and the ``(N, 3)`` stat
    and ``(N,)`` hash to store (rows to detect: their current stat, hash 0 until detected); plus a note for the
    log. Hashes files as ``verify`` says (module docstring). A file whose mtime or ctime is within ``_RACY_NS`` of
    ``started`` (the stat's time) or later is stored with ctime -2, so that the next check hashes it: a change in
    the same timestamp tick as this check leaves the timestamps as they are."""
    n = len(files)
    src = np.full(n, -1, dtype=np.int64)
    new_hash = np.zeros(n, dtype=np.uint64)
    new_stat = stat.copy()
    racy = stat[:, 1:].max(1) >= started - _RACY_NS
    if old is None:
        new_stat[racy, 2] = -2
        return src, new_stat, new_hash, f"{n} new"
    if old.files == files:
        pairs = np.stack([np.arange(n), np.arange(n)], 1)
    else:
        pos = {f: i for i, f in enumerate(old.files)}
        pairs = np.array([(i, pos[f]) for i, f in enumerate(files) if f in pos], dtype=np.int64).reshape(-1, 2)
    pairs = pairs[old.count[pairs[:, 1]] >= 0]  # rows detected
    now, was, known = stat[pairs[:, 0]], old.stat[pairs[:, 1]], old.hash[pairs[:, 1]]
    same_size = (now[:, 0] == was[:, 0]) & (now[:, 0] >= 0)
    if verify == "stat":
        keep = (now[:, :2] == was[:, :2]).all(1)
        recheck = np.zeros(len(pairs), dtype=bool)
    elif verify == "auto":
        keep = (now == was).all(1)
        recheck = ~keep & same_size & (known != 0)
    else:  # content
        keep = np.zeros(len(pairs), dtype=bool)
        recheck = same_size & (known != 0)
    if recheck.any():
        keep[recheck] = _hash_files([paths[i] for i in pairs[recheck, 0]]) == known[recheck]
    kept = pairs[keep]
    src[kept[:, 0]] = kept[:, 1]
    new_hash[kept[:, 0]] = old.hash[kept[:, 1]]
    new_stat[racy, 2] = -2
    if verify == "stat":  # nothing verified: the reused rows keep their stored ctime (a later "auto" run checks it)
        new_stat[kept[:, 0]] = old.stat[kept[:, 1]]
    hashed = f", {int(recheck.sum())} hashed" if verify != "stat" else ""
    return src, new_stat, new_hash, (f"checked by {verify}{hashed}: {len(kept)} reused, "
                                     f"{len(pairs) - len(kept)} changed, {n - len(pairs)} new or not detected yet")


def _replace(directory: Path, name: str, write) -> None:
    """Write ``directory/name`` through a temporary file (``write(binary file)``) and an atomic rename."""
    tmp = directory / f".{name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, directory / name)


def _layout(directory: Path, source: Path, files: list[str], root: str, k: int, sift: dict, image_size,
            old: _Index | None, checked: tuple) -> tuple[np.ndarray, str]:
    """Make the arrays in ``directory`` match ``files``: the rows :func:`_check` (``checked``) took from the cache in
    ``source`` (index ``old``) copied or kept in place, the others marked -1. Returns the indices of the rows still
    to detect and the check's note."""
    src, new_stat, new_hash, note = checked
    n = len(files)
    if old is not None and source == directory and old.files == files:  # same files, same order: in place
        redo = np.flatnonzero((src < 0) & (old.count >= 0))
        if len(redo):
            count = np.load(directory / "count.npy", mmap_mode="r+")
            count[redo] = -1  # first: a run killed after this line detects them again
            count.flush()
            del count
        if (new_stat != old.stat).any():
            _replace(directory, "stat.npy", lambda f: np.save(f, new_stat))
        if (new_hash != old.hash).any():
            _replace(directory, "hash.npy", lambda f: np.save(f, new_hash))
    else:  # first build, files added/removed, or seeded from another directory: new arrays
        (directory / "meta.json").unlink(missing_ok=True)  # incomplete until meta.json is written again
        tmp = directory / f".keypoints.npy.tmp{os.getpid()}"
        kp = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, k, 4))
        count = np.full(n, -1, dtype=np.int16)
        rows = np.flatnonzero(src >= 0)
        if len(rows):
            prev = np.load(source / "keypoints.npy", mmap_mode="r")
            for lo in range(0, len(rows), 65536):  # chunked copy: never the whole array in memory
                r = rows[lo : lo + 65536]
                kp[r] = prev[src[r]]
                count[r] = old.count[src[r]]
            del prev
        kp.flush()
        del kp
        os.replace(tmp, directory / "keypoints.npy")
        _replace(directory, "count.npy", lambda f: np.save(f, count))
        _replace(directory, "stat.npy", lambda f: np.save(f, new_stat))
        _replace(directory, "hash.npy", lambda f: np.save(f, new_hash))
        _replace(directory, "files.txt", lambda f: f.write("\n".join(files).encode()))
        meta = {"version": _VERSION, "n": n, "max_keypoints": k, "sift": sift, "size": list(image_size),
                "root": os.path.abspath(root)}
        _replace(directory, "meta.json", lambda f: f.write(json.dumps(meta, indent=1, default=str).encode()))
    return np.flatnonzero(np.load(directory / "count.npy") < 0), note


class _Hashing(Dataset):
    """Items ``rows`` of ``dataset``, each with ``content_hash``: :func:`_hash_file` of its file as an int64 tensor
    (the uint64's bits), read right before the dataset decodes it (the decode then reads the page cache)."""

    def __init__(self, dataset: Dataset, rows: list[int]) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> dict:
        i = self.rows[j]
        h = _hash_file(str(self.dataset.samples[i][0]))
        item = dict(self.dataset[i])
        item["content_hash"] = torch.tensor(h - (1 << 64) if h >= 1 << 63 else h, dtype=torch.int64)
        return item


def _detect_rows(directory: Path, dataset: Dataset, rows: np.ndarray, prepare, sift: dict, device, batch_size: int,
                 num_workers: int, progress: bool) -> tuple[int, int, float]:
    """Detect the keypoints of ``dataset[rows]`` in batches and write them, and the files' hashes, into the
    memory-mapped arrays, flushing as it goes (an interrupted build resumes at the rows still -1). Returns the
    images detected, the unreadable ones among them and the seconds taken."""
    if len(rows) == 0:
        return 0, 0, 0.0
    kp_out = np.load(directory / "keypoints.npy", mmap_mode="r+")
    count_out = np.load(directory / "count.npy", mmap_mode="r+")
    hash_out = np.load(directory / "hash.npy", mmap_mode="r+")
    loader = DataLoader(_Hashing(dataset, rows.tolist()), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=default_collate, pin_memory=torch.device(device).type == "cuda")
    bar = BuildProgress(len(rows), f"keypoint cache {directory.name}", log, _PROGRESS_EVERY_S, enabled=progress)
    t0, done, bad = time.perf_counter(), 0, 0
    for i, batch in enumerate(loader):
        x = prepare(batch["image"].to(device, non_blocking=True))
        packed, count = pack_keypoints(detect_keypoints(x, **sift))
        idx = batch["index"].numpy()
        kp_out[idx] = packed.cpu().numpy()
        hash_out[idx] = batch["content_hash"].numpy().view(np.uint64)
        count_out[idx] = count.cpu().numpy()
        if "valid" in batch:
            bad += int((~batch["valid"]).sum())
        done += len(idx)
        bar.update(len(idx))
        if i % 50 == 49:
            kp_out.flush()
            hash_out.flush()
            count_out.flush()
    kp_out.flush()
    hash_out.flush()
    count_out.flush()
    bar.close()
    return done, bad, time.perf_counter() - t0


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
