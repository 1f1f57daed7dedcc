"""The keypoint cache on an image folder: build rate, disk size, and what a guided step costs with it, in one run.

    python bench/folder_cache.py [--images 20000] [--size 224] [--root DIR] [--steps 20] [--device cpu|cuda]
                                 [overrides ...]

1. A folder of ``--images`` JPEGs (``--size`` px, 10 classes; crops of the photos bundled with scikit-image, or
   random textures without it) is generated under ``--root`` unless it is there already.
2. The cache is built as a training run builds it (:class:`~siftguide.relevance.folder_cache.FolderKeypointCache`,
   the composed config's detector settings and model size: by default the 64 px ViT and 64 keypoints): images/s,
   process CPU seconds, disk bytes per image and per million images. A second ``prepare`` (what every later run
   does: check the files, reuse) is timed too.
3. Training steps on that folder, the variants interleaved step by step (drift hits all alike): ``baseline``,
   ``prior+cache`` (keypoints read by the loader with each image, mapped through the augmentation) and
   ``prior+on-the-fly`` (SIFT on the augmented batch). Per step: process CPU time (the cost axis on a CPU, which
   contention does not bend; the loader runs in the process) and wall-clock; printed as ratios to the baseline
   (guided/baseline throughput = baseline cost / guided cost).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.throughput import make_module  # noqa: E402


def generate(root: Path, n: int, size: int, classes: int = 10, val: int = 200, seed: int = 0) -> None:
    """``root/train/c<k>/<i>.jpg`` (n images) and ``root/val/c<k>/<i>.jpg`` (``val``), unless already complete."""
    from PIL import Image

    done = root / ".complete"
    if done.exists() and json.loads(done.read_text()) == {"n": n, "size": size}:
        return
    rng = np.random.default_rng(seed)
    try:
        from tests.oracle import photo_batch

        pool = photo_batch(size * 2, crops_per_photo=4, seed=seed)[:, 0].numpy()  # (80, 2s, 2s) grey crops
    except Exception as e:  # noqa: BLE001 - optional photos
        print(f"photos unavailable ({type(e).__name__}); random textures")
        pool = (rng.random((20, size * 2, size * 2)) * 255).astype(np.uint8)
    t0 = time.perf_counter()
    for split, count in (("train", n), ("val", val)):
        for i in range(count):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            src = pool[rng.integers(len(pool))]
            y, x = rng.integers(0, size, 2)
            crop = src[y : y + size, x : x + size]
            Image.fromarray(crop, "L").convert("RGB").save(d / f"{i:06d}.jpg", quality=90)
    done.write_text(json.dumps({"n": n, "size": size}))
    print(f"generated {n} + {val} JPEGs of {size} px in {root} in {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--root", default="/tmp/siftguide-folder-bench")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file for the numbers")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every variant (model, batch size, ...)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    root = Path(args.root)
    generate(root, args.images, args.size)
    from hydra.utils import instantiate

    from siftguide.relevance.folder_cache import FolderKeypointCache, WithKeypoints

    common = [f"data=image_folder", f"data.root={root}", "data.num_workers=0", "model.in_chans=1", "transform=grey",
              "num_classes=10", "callbacks.knn=null", *args.overrides]
    variants = {"baseline": ["guidance=none"], "prior+cache": ["guidance=prior", "relevance.cache=true"],
                "prior+on-the-fly": ["guidance=prior", "relevance.cache=false"]}
    built = {k: make_module(common + v, dev) for k, v in variants.items()}
    cfg, cm = built["prior+cache"]
    dm = instantiate(cfg.data)
    dm.setup()
    cache_dir = root.parent / (root.name + "-cache")
    out: dict = {"device": str(dev), "images": len(dm.train_set), "size": args.size, "model_size": list(cm.transform.size),
                 "sift": dict(cm.relevance.sift), "batch": int(cfg.data.batch_size), "threads": torch.get_num_threads()}

    # ---- build (a fresh directory each run: the rate of a first build), then what a later run pays
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    cache = FolderKeypointCache.prepare(dm.train_set, cm.transform.resize, cm.relevance.sift, cm.transform.size,
                                        cache_dir, device=dev, batch_size=256, num_workers=0, progress=False)
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    FolderKeypointCache.prepare(dm.train_set, cm.transform.resize, cm.relevance.sift, cm.transform.size, cache_dir,
                                device=dev, progress=False)
    reuse_s = time.perf_counter() - t0
    n, size = len(cache), cache.disk_bytes()
    out["build"] = {"seconds": build_s, "cpu_seconds": build_cpu, "img_s": n / build_s, "img_per_cpu_s": n / build_cpu,
                    "disk_bytes": size, "bytes_per_image": size / n, "gb_per_million": size / n * 1e6 / 1e9,
                    "hours_per_million_at_this_rate": 1e6 / (n / build_s) / 3600, "reuse_check_s": reuse_s}
    print(f"cache: {n} images in {build_s:.1f} s ({n / build_s:.0f} img/s; {n / build_cpu:.0f} img per CPU-second), "
          f"{size / 1e6:.1f} MB on disk ({size / n:.0f} B/image, {size / n * 1e6 / 1e9:.2f} GB per million images); "
          f"a later run's check and reuse: {reuse_s:.2f} s")

    # ---- steps: the real loader (in the process), device pipeline, relevance, forward, backward, AdamW
    def batches(ds):  # the same seeded order for every variant, cycling over epochs
        epoch = 0
        while True:
            yield from torch.utils.data.DataLoader(ds, int(cfg.data.batch_size), shuffle=True, drop_last=True,
                                                   generator=torch.Generator().manual_seed(epoch))
            epoch += 1

    with_kp = WithKeypoints(dm.train_set, cache)
    loaders = {k: batches(with_kp if k == "prior+cache" else dm.train_set) for k in built}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (_, m) in built.items()}
    cost = {k: [] for k in built}
    wall = {k: [] for k in built}
    for i in range(args.warmup + args.steps):
        for name, (_, m) in built.items():
            m.train()
            sync()
            t, c = time.perf_counter(), time.process_time()
            batch = next(loaders[name])  # the loader's decoding and reading are part of the step
            b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
            b.pop("valid", None)
            b = m.on_after_batch_transfer(b, 0)
            loss = m.training_step(b, 0)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            sync()
            if i >= args.warmup:
                cost[name].append(time.process_time() - c)
                wall[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in cost.items()}
    medw = {k: statistics.median(v) for k, v in wall.items()}
    out["steps"] = {k: {"cost_ms": med[k] * 1e3, "wall_ms": medw[k] * 1e3,
                        "throughput_ratio_cost": med["baseline"] / med[k],
                        "throughput_ratio_wall": medw["baseline"] / medw[k]} for k in built}
    print(f"steps ({dev}, batch {cfg.data.batch_size}, model {cm.transform.size[0]} px, {args.steps} timed each, "
          f"interleaved; median process CPU time per step, and wall-clock):")
    for k, v in out["steps"].items():
        print(f"  {k:17s} cost {v['cost_ms']:8.1f} ms  wall {v['wall_ms']:8.1f} ms  guided/baseline throughput "
              f"{v['throughput_ratio_cost']:.3f} (cost) {v['throughput_ratio_wall']:.3f} (wall)")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
