"""What the folder keypoint cache's check of an already complete cache costs per run, by ``verify`` mode.

    python bench/folder_cache_verify.py [--sizes 4000 60000] [--root /tmp/siftguide-verify-bench] [--repeat 5]

For each size, a folder ``<root>/n<size>/train/c<k>/<i>.png`` of 64x64 grey PNGs (noise textures, about 4.2 kB
each; 10 classes, plus a small ``val``) is written unless it is there already, and its cache built once
(:meth:`~siftguide.relevance.folder_cache.FolderKeypointCache.prepare`; the detector is replaced by one returning no
keypoints, as the check never reads the keypoints: only the files' stats and bytes). Then, timed (median of
``--repeat``, wall clock, the page cache warm: the folder was just written and read):

- ``stat pass``: one ``os.stat`` per file, what ``verify="stat"`` and ``"auto"`` do on an unchanged folder;
  ``hash pass``: read and BLAKE2b-hash every file, what ``verify="content"`` adds; ``crc32 pass``: the same with
  ``zlib.crc32`` (the cheaper checksum, for the choice of hash). All three as the cache runs them
  (``folder_cache._map``: serial while the files answer fast, 16 threads once they make it wait);
  ``hash pass, cold data``: the hash pass after ``posix_fadvise(DONTNEED)`` on every file (file data evicted from
  the page cache, inodes still cached: a local disk's cost, far below a network file system's cold read);
- ``prepare(verify=...)``: the whole call on the complete cache (stat or hash pass, index read, comparison, open),
  for ``stat``, ``auto`` and ``content``; the ratio ``content / auto``;
- ``import siftguide.train``: a fresh interpreter importing the training entry point, the floor of any run's start
  (model build, data setup and the first step come on top), as the yardstick of what a check may cost.

Measured (2 CPU cores shared with other jobs, load average 5-7; local overlay disk on a VM; Python 3.11; page cache
warm except ``hash cold``; median of 5)::

    $ OMP_NUM_THREADS=1 .venv/bin/python bench/folder_cache_verify.py
     files  stat pass  hash pass  crc32 pass  hash cold  prepare(stat)  prepare(auto)  prepare(content)  content/auto
      4000     0.018s     0.097s      0.098s     0.564s         0.026s         0.025s            0.127s          5.0x
     60000     0.304s     1.545s      1.205s     8.919s         0.375s         0.391s            2.084s          5.3x
    import siftguide.train: 12.43 s

Reading: ``"auto"`` costs what ``"stat"`` costs (0.39 s for 60,000 files); ``"content"`` adds the hash pass, 1.7 s
warm (14 % of the bare import, before any model or data set-up) and 8.9 s with the file data cold on a local disk
(more on a network file system). Hence ``verify="auto"`` by default: it catches a same-size replacement with its
mtime kept at the stat check's cost (ctime; module docstring), ``"content"`` where ctime cannot be trusted. crc32
saves little over BLAKE2b here (the open/read syscalls dominate on small files), so the cache keeps BLAKE2b's 64-bit
digest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 64  # image side, pixels
K = 8  # max_keypoints of the bench's cache (the check does not depend on it)


def generate(root: Path, n: int, classes: int = 10, val: int = 20, seed: int = 0) -> None:
    """``root/train/c<k>/<i>.png`` (``n`` 64x64 grey noise-texture PNGs) and ``root/val/...`` (``val``), unless
    already complete."""
    from PIL import Image

    done = root / ".complete"
    if done.exists() and json.loads(done.read_text()) == {"n": n, "size": SIZE}:
        return
    rng = np.random.default_rng(seed)
    pool = (rng.random((16, SIZE * 2, SIZE * 2)) * 255).astype(np.uint8)
    t0 = time.perf_counter()
    for split, count in (("train", n), ("val", val)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            y, x = rng.integers(0, SIZE, 2)
            crop = pool[rng.integers(len(pool))][y : y + SIZE, x : x + SIZE]
            Image.fromarray(crop, "L").save(root / split / f"c{i % classes}" / f"{i:06d}.png")
    done.write_text(json.dumps({"n": n, "size": SIZE}))
    print(f"generated {n} + {val} PNGs in {root} in {time.perf_counter() - t0:.0f} s", flush=True)


def _no_keypoints(x, max_keypoints=K, **_):
    from siftguide.relevance.detector import Keypoints

    b = x.shape[0]
    z = torch.zeros(b, max_keypoints)
    return Keypoints(torch.zeros(b, max_keypoints, 2), z, z, torch.zeros(b, max_keypoints, dtype=torch.bool),
                     torch.zeros(b, max_keypoints, dtype=torch.long))


def _crc32_file(path: str) -> int:
    with open(path, "rb") as f:
        return zlib.crc32(f.read())


def _evict(paths: list[str]) -> None:
    """Drop the files' data from the page cache (``POSIX_FADV_DONTNEED``; clean pages only)."""
    def one(p):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, paths, chunksize=256))


def _median(fn, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(root: Path, n: int, repeat: int) -> dict:
    from siftguide.data import DeviceTransform, ImageFolderDataModule
    from siftguide.relevance import folder_cache
    from siftguide.relevance.folder_cache import FolderKeypointCache

    generate(root, n)
    dm = ImageFolderDataModule(str(root), img_size=SIZE, batch_size=512, num_workers=0, in_chans=1, num_classes=10)
    dm.setup()
    ds = dm.train_set
    paths = [p for p, _ in ds.samples]
    transform = DeviceTransform(SIZE)
    sift = {"max_keypoints": K}
    cache_dir = root / "cache"

    def prepare(verify: str):
        return FolderKeypointCache.prepare(ds, transform.resize, sift, transform.size, cache_dir, batch_size=512,
                                           progress=False, verify=verify)

    real = folder_cache.detect_keypoints
    folder_cache.detect_keypoints = _no_keypoints
    try:
        t0 = time.perf_counter()
        cache = prepare("auto")  # builds once (a later run of the bench reuses it)
        print(f"n={n}: cache complete in {time.perf_counter() - t0:.1f} s ({cache.directory})", flush=True)
        res = {"files": n}
        res["stat_pass_s"] = _median(lambda: folder_cache._identity(paths, str(root)), repeat)
        res["hash_pass_s"] = _median(lambda: folder_cache._hash_files(paths), repeat)
        res["crc32_pass_s"] = _median(lambda: folder_cache._map(_crc32_file, paths), repeat)
        res["hash_pass_cold_s"] = _median(lambda: folder_cache._hash_files(paths), repeat, lambda: _evict(paths))
        folder_cache._hash_files(paths)  # warm again
        for verify in ("stat", "auto", "content"):
            res[f"prepare_{verify}_s"] = _median(lambda: prepare(verify), repeat)
        res["content_over_auto"] = res["prepare_content_s"] / res["prepare_auto_s"]
    finally:
        folder_cache.detect_keypoints = real
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 60000])
    ap.add_argument("--root", default="/tmp/siftguide-verify-bench")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON file for the numbers")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(Path(args.root) / f"n{n}", n, args.repeat) for n in args.sizes]
    imports = _median(lambda: subprocess.run([sys.executable, "-c", "import siftguide.train"], cwd=ROOT, check=True),
                      3)
    print(f"\n{'files':>6} {'stat pass':>10} {'hash pass':>10} {'crc32 pass':>11} {'hash cold':>10} "
          f"{'prepare(stat)':>14} {'prepare(auto)':>14} {'prepare(content)':>17} {'content/auto':>13}")
    for r in rows:
        print(f"{r['files']:>6} {r['stat_pass_s']:>9.3f}s {r['hash_pass_s']:>9.3f}s {r['crc32_pass_s']:>10.3f}s "
              f"{r['hash_pass_cold_s']:>9.3f}s {r['prepare_stat_s']:>13.3f}s {r['prepare_auto_s']:>13.3f}s "
              f"{r['prepare_content_s']:>16.3f}s {r['content_over_auto']:>12.1f}x")
    print(f"import siftguide.train: {imports:.2f} s")
    out = {"rows": rows, "import_s": imports}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
