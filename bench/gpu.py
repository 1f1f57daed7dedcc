"""One-shot GPU benchmark: the detector's speed, and guided vs baseline ViT-S/16 training steps.

    python bench/gpu.py [--smoke] [--out FILE.json] [--device cuda|cpu] [--no-compile] [--budget-s 330]

Part 1, SIFT: images/s of ``detect_keypoints`` on batches of ``--sift-batch`` (256) grey photos (the real photos
bundled with scikit-image, random square crops, area-resized; smooth random textures if scikit-image or OpenCV is
missing) at 64/128/224 px: eager, recorded in a CUDA graph (``Captured(backend="graph")``, CUDA only) and
``torch.compile``'d (``mode="reduce-overhead"``; compile time reported apart), against OpenCV's ``SIFT.detect`` on
the CPU, image by image (``bench/sift.py``'s ``timeit``: one warm-up, best of repeats).

Part 2, training steps: one optimizer step of timm ``vit_small_patch16_224`` (batch 256, 224 px, 3 channels,
bf16 autocast, AdamW) = uint8 batch gathered from a fixed pool of photo crops already on the device ->
``DeviceTransform`` (resize + random resized crop + flip, its matrix kept) -> relevance -> forward -> cross
entropy (+ ``AttentionAlignment`` loss, last block, weight 0.3) -> backward -> AdamW step, for

* ``baseline``: no relevance, no guidance (fused attention everywhere);
* ``guided``: SIFT on the fly, eager detector, on the augmented batch (the old default);
* ``guided+graph``: on the fly, the detector and the map recorded in a CUDA graph (the default on CUDA);
* ``guided+prefetch``: the next batch's keypoints detected (graph) on a side stream during the step, on the
  un-augmented images, mapped through the augmentation (``relevance.prefetch``, the default on CUDA on the fly);
* ``guided+cache``: keypoints detected once per pool image (``KeypointCache``), looked up on the device;
* ``guided+folder``: the folder cache's path: fp16 rows read on the host by index and copied with the batch;
* ``guided+compile``: on the fly with the ``torch.compile``'d detector (round 2, when the budget allows).

The variants run interleaved, step by step, so drift hits all alike. Reported: median step time, images/s, the
guided/baseline throughput ratio, peak allocated memory (CUDA; reset before every step, max over the timed steps;
absolute, with every variant's weights and optimizer state resident, and the step's own peak above what was
allocated before it) and bytes saved for backward (any device), with their ratios to the baseline. A replayed CUDA
graph allocates nothing, so the graph variants' detector memory (the graph's private pool) is not in those peaks:
it shows in ``warmup_reserved_mib``, what the allocator reserved during each variant's warm-up steps. Data loading is
not timed (the pool is on the device, as after the transfer).

Part 3, the folder cache: a folder of ``--folder-images`` JPEGs (224 px) is generated and its cache built as a
training run builds it (``FolderKeypointCache.prepare``, loader workers decoding): images/s and bytes per image.

Part 4, self-distillation: DINO and iBOT (block, SIFT and teacher-attention masks) against the supervised baseline,
step-rate ratio and activation memory (``bench/throughput.py --ssl`` on the device; not with ``--smoke``).

Each part prints its table and rewrites ``--out`` as soon as it ends, so a run cut short keeps what it measured.
A compile starts only while more of ``--budget-s`` is left than it is expected to take (``--compile-estimate-s``,
or 1.2x the last compile), and after ``--hard-limit-s`` the process exits with what it has. A part that fails is
recorded under ``errors`` and the next part still runs.
``--smoke``: tiny sizes on the CPU (32/64 px, batch 8, a 2-block ViT at 64 px, 2 steps, no compile) for the tests.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sift import timeit  # noqa: E402
from siftguide import AttentionAlignment, relevance_from_keypoints  # noqa: E402
from siftguide.data import DeviceTransform  # noqa: E402
from siftguide.relevance import KeypointCache, detect_keypoints, transform_keypoints  # noqa: E402
from siftguide.relevance.cache import pack_keypoints, unpack_keypoints  # noqa: E402
from siftguide.relevance.graph import Captured  # noqa: E402
from siftguide.relevance.prefetch import DevicePrefetcher  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

FULL = dict(sizes=[64, 128, 224], sift_batch=256, repeats=10, cv_repeats=3, model="vit_small_patch16_224", depth=None,
            img_size=224, pool_size=256, batch=256, pool=512, steps=20, warmup=3, classes=1000, folder_images=8192,
            folder_workers=12)
SMOKE = dict(sizes=[32, 64], sift_batch=8, repeats=1, cv_repeats=1, model="vit_tiny_patch16_224", depth=2,
             img_size=64, pool_size=72, batch=8, pool=16, steps=2, warmup=1, classes=10, folder_images=24,
             folder_workers=0)


# ------------------------------------------------------------------------------------------------------ helpers
def images(size: int, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``(n, 1, size, size)`` uint8 grey images and where they come from: crops of scikit-image's photos, or
    smooth random textures (blobs at several scales, which SIFT finds keypoints in) when those are missing."""
    try:
        from tests.oracle import photo_batch

        x = photo_batch(size, crops_per_photo=math.ceil(n / 20), seed=seed)
        return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]], "scikit-image photos"
    except Exception as e:  # noqa: BLE001 - optional image set (scikit-image, OpenCV are dev dependencies)
        print(f"photos unavailable ({type(e).__name__}: {e}); using synthetic textures")
    g = torch.Generator().manual_seed(seed)
    x = sum(F.interpolate(torch.rand(n, 1, c, c, generator=g), size=(size, size), mode="bicubic", align_corners=False)
            / (i + 1) for i, c in enumerate((4, 8, 16, 32)))
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    return (x * 255).round().clamp(0, 255).to(torch.uint8), "synthetic textures"


class Stopwatch:
    """Time since the start and time left in the run's budget."""

    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.last_compile_s: float | None = None  # the next compile is expected to take about as long

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def compile_veto(self, args) -> str | None:
        """Why no compile may start now (None: it may)."""
        if args.no_compile:
            return "--no-compile"
        need = max(args.compile_estimate_s, 1.2 * (self.last_compile_s or 0.0))
        return f"budget: {self.left():.0f} s left < {need:.0f} s expected" if self.left() < need else None


class Report:
    """The results dict, rewritten to ``path`` (atomically) after every part."""

    def __init__(self, path: str | None, meta: dict) -> None:
        self.path = Path(path) if path else None
        self.data = {"meta": meta, "sift": [], "steps": None, "status": "running"}

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def meta(args, dev: torch.device) -> dict:
    import kornia
    import timm

    try:
        import cv2

        cv = {"opencv": cv2.__version__, "opencv_threads": cv2.getNumThreads()}
    except ImportError:
        cv = {"opencv": None}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": str(dev), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "timm": timm.__version__, "kornia": kornia.__version__, **cv, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "smoke": args.smoke,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }


# ------------------------------------------------------------------------------------------------ part 1: SIFT
def _detector(kw: dict):
    return lambda x: pack_keypoints(detect_keypoints(x, **kw), torch.float32)


def sift_part(args, dev, sync, report: Report) -> dict[int, torch.Tensor]:
    """Eager and CUDA-graph detector and OpenCV per size; returns the device batches for the compiled pass later."""
    batches = {}
    try:
        import cv2

        sift_cv = cv2.SIFT_create()
    except ImportError:
        sift_cv = None
    print(f"\n== part 1: SIFT images/s, batch {args.sift_batch} ({dev}) vs OpenCV SIFT.detect (CPU, image by image)")
    for size in args.sizes:
        u8, source = images(size, args.sift_batch)
        x = u8.float().div(255).to(dev)
        if len(x) < args.sift_batch:  # fewer photos than the batch: repeat them
            x = x.repeat(math.ceil(args.sift_batch / len(x)), 1, 1, 1)[: args.sift_batch]
        batches[size] = x
        kw = dict(max_keypoints=1024 if size > 128 else 512)  # as bench/sift.py
        t_eager = timeit(lambda: detect_keypoints(x, **kw), args.repeats, sync) / len(x)
        n_kp = float(detect_keypoints(x, **kw).valid.sum(1).float().mean())
        row = {"size": size, "batch": len(x), "images": source, "max_keypoints": kw["max_keypoints"],
               "keypoints_per_image": n_kp, "eager_img_s": 1 / t_eager, "graph_img_s": None, "graph_skipped": None,
               "graph_vs_eager": None, "compiled_img_s": None, "compile_s": None, "compiled_skipped": "not run yet",
               "opencv_img_s": None, "eager_vs_opencv": None, "graph_vs_opencv": None, "compiled_vs_opencv": None,
               "compiled_vs_eager": None}
        if dev.type == "cuda":
            graphed = Captured(_detector(kw), "graph")
            graphed(x), graphed(x)  # eager, then recorded
            t_graph = timeit(lambda: graphed(x), args.repeats, sync) / len(x)
            ref, got = _detector(kw)(x), graphed(x)
            row.update(graph_img_s=1 / t_graph, graph_vs_eager=t_eager / t_graph,
                       graph_max_abs_diff=float((ref[0] - got[0]).abs().max()),
                       graph_counts_equal=bool(torch.equal(ref[1], got[1])))
        else:
            row["graph_skipped"] = "CUDA graphs need a CUDA device"
        if sift_cv is not None:
            arr = u8[:, 0].numpy()
            t_cv = timeit(lambda: [sift_cv.detect(im, None) for im in arr], args.cv_repeats, lambda: None) / len(arr)
            row.update(opencv_img_s=1 / t_cv, eager_vs_opencv=t_cv / t_eager,
                       opencv_keypoints_per_image=sum(len(sift_cv.detect(im, None)) for im in arr) / len(arr))
            if row["graph_img_s"]:
                row["graph_vs_opencv"] = row["graph_img_s"] / row["opencv_img_s"]
        report.data["sift"].append(row)
        report.save()
        print(f"  {size:4d} px  eager {row['eager_img_s']:9.1f} img/s  graph {fmt(row['graph_img_s'], '9.1f')} img/s  "
              f"OpenCV {fmt(row['opencv_img_s'], '9.1f')} img/s  eager/OpenCV {fmt(row['eager_vs_opencv'], '6.2f')}x  "
              f"({n_kp:.0f} keypoints/image)")
    return batches


def sift_compiled_part(args, dev, sync, report: Report, batches: dict[int, torch.Tensor], clock: Stopwatch) -> None:
    """The compiled detector per size, largest first (the size that matters most), while the budget allows."""
    print(f"\n== part 1b: compiled SIFT (static shapes, one graph per size)")
    rows = {r["size"]: r for r in report.data["sift"]}
    for size in sorted(batches, reverse=True):
        row = rows[size]
        reason = clock.compile_veto(args)
        if reason is None:
            x = batches[size]
            kw = dict(max_keypoints=row["max_keypoints"])
            try:
                torch._dynamo.reset()  # a static-shape graph per size, as in a run at one image and batch size
                fast = Captured(_detector(kw), "compile")
                t0 = time.perf_counter()
                fast(x)
                sync()
                compile_s = clock.last_compile_s = time.perf_counter() - t0
                t = timeit(lambda: fast(x), args.repeats, sync) / len(x)
                row.update(compiled_img_s=1 / t, compile_s=compile_s, compiled_skipped=None,
                           compiled_vs_eager=(1 / t) / row["eager_img_s"])
                if row["opencv_img_s"]:
                    row["compiled_vs_opencv"] = (1 / t) / row["opencv_img_s"]
            except Exception as e:  # noqa: BLE001 - a failed compile is reported, the rest still runs
                reason = f"compile failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        if reason is not None:
            row["compiled_skipped"] = reason
        report.save()
        print(f"  {size:4d} px  compiled {fmt(row['compiled_img_s'], '9.1f')} img/s  "
              f"(compile {fmt(row['compile_s'], '.0f')} s)  compiled/OpenCV {fmt(row['compiled_vs_opencv'], '6.2f')}x"
              + (f"  [{reason}]" if reason else ""))


# ---------------------------------------------------------------------------------------- part 2: training steps
class StepBench:
    """Same-initialised ViTs, one per variant, and the timed optimizer step; rounds of variants run interleaved."""

    SOURCE = {"baseline": None, "guided": "eager", "guided+graph": "graph", "guided+prefetch": "prefetch",
              "guided+cache": "cache", "guided+folder": "folder", "guided+compile": "compiled"}

    def __init__(self, args, dev: torch.device, sync) -> None:
        import timm

        self.args, self.dev, self.sync = args, dev, sync
        self.size = (args.img_size, args.img_size)
        self.transform = DeviceTransform(args.img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip=True,
                                         crop_scale=(0.35, 1.0), crop_ratio=(0.75, 4 / 3)).to(dev)
        grey, self.pool_source = images(args.pool_size, args.pool, seed=1)
        self.pool = grey.expand(-1, 3, -1, -1).contiguous().to(dev)  # (N, 3, s, s) uint8, as after the transfer
        self.sift_kw = dict(max_keypoints=512)  # configs/experiment/vit_s16_imagefolder.yaml
        self.nets, self.opts, self.guides = {}, {}, {}
        for name, source in self.SOURCE.items():
            torch.manual_seed(0)  # same initial weights for every variant
            kw = {"depth": args.depth} if args.depth else {}
            net = timm.create_model(args.model, pretrained=False, num_classes=args.classes, img_size=args.img_size,
                                    drop_path_rate=0.1, **kw).to(dev)
            self.nets[name] = net
            self.opts[name] = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
            self.guides[name] = AttentionAlignment(net, layers=[-1], weight=0.3) if source else None
        self.patch = self.nets["baseline"].patch_embed.patch_size
        self.grid = self.nets["baseline"].patch_embed.grid_size

        def sift_map(x):
            return relevance_from_keypoints(detect_keypoints(x, **self.sift_kw), self.grid, self.patch)

        # on the fly: the detector alone (eager, as before), the detector and the map recorded in one CUDA graph,
        # and the compiled detector (set by compile_detector())
        self.maps = {"eager": sift_map, "graph": Captured(sift_map, "graph"), "compiled": None}
        self.keypoints = Captured(_detector(self.sift_kw), "graph")  # the prefetcher's: un-augmented images
        g = torch.Generator().manual_seed(0)
        n = args.warmup + args.steps + 1
        self.index_cpu = [torch.randint(len(self.pool), (args.batch,), generator=g) for _ in range(n)]
        self.index = [i.to(dev) for i in self.index_cpu]
        self.labels = [torch.randint(args.classes, (args.batch,), generator=g).to(dev) for _ in range(n)]
        self.cache = self.rows = None
        self.ahead = None  # the prefetcher's iterator over the steps of a round

    def build_cache(self) -> float:
        """Seconds to detect the keypoints of the whole pool (in training: once at fit start, or loaded); also keeps
        the pool's keypoints as the folder cache stores them (fp16 rows in host memory, pinned on CUDA)."""
        self.sync()
        t0 = time.perf_counter()
        self.cache = KeypointCache.build(self.pool, self.transform.resize, self.sift_kw, batch_size=self.args.batch,
                                         device=self.dev).to(self.dev)
        self.sync()
        dt = time.perf_counter() - t0
        kp = self.cache.lookup(torch.arange(len(self.pool), device=self.dev))
        rows, count = pack_keypoints(kp)
        self.rows = (rows.cpu().pin_memory(), count.cpu().pin_memory()) if self.dev.type == "cuda" else \
            (rows.cpu(), count.cpu())
        return dt

    def compile_detector(self) -> float:
        """Seconds to compile the detector for this batch shape (the first call; untimed in the rounds)."""
        fast = Captured(self.maps["eager"], "compile")
        with torch.no_grad():
            x = self.transform(self.pool[self.index[0]], train=True)
        self.sync()
        t0 = time.perf_counter()
        fast(x)
        self.sync()
        self.maps["compiled"] = fast
        return time.perf_counter() - t0

    def _prefetched(self):
        """Batches of a round as the prefetcher delivers them: resized images and their keypoints, detected on a side
        stream one step ahead."""
        def prepare(batch):
            x = self.transform.resize(batch["image"])
            batch["keypoints"], batch["keypoint_count"] = self.keypoints(x)
            return batch

        return iter(DevicePrefetcher(({"image": self.pool[idx]} for idx in self.index), prepare, self.dev))

    def relevance(self, source: str, i: int, x: torch.Tensor, matrix: torch.Tensor, batch: dict | None):
        if source == "cache":
            kp = self.cache.lookup(self.index[i], matrix, self.size)
        elif source == "folder":  # rows read on the host by index, copied with the batch
            rows, count = (t[self.index_cpu[i]].to(self.dev, non_blocking=True) for t in self.rows)
            kp = transform_keypoints(unpack_keypoints(rows, count), matrix, self.size)
        elif source == "prefetch":
            kp = transform_keypoints(unpack_keypoints(batch["keypoints"], batch["keypoint_count"]), matrix, self.size)
        else:
            return self.maps[source](x)
        return relevance_from_keypoints(kp, self.grid, self.patch)

    def step(self, name: str, i: int, count_saved: bool = False) -> tuple[float, int, int, int, int]:
        """One optimizer step: (seconds, peak allocated bytes, peak bytes above what was allocated before the step,
        bytes the allocator reserved during the step (these three CUDA only, else 0), bytes saved for backward (when
        ``count_saved``, else 0))."""
        net, opt, guide, source = self.nets[name], self.opts[name], self.guides[name], self.SOURCE[name]
        net.train()
        before = reserved = 0
        if self.dev.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.dev)
            before, reserved = torch.cuda.memory_allocated(self.dev), torch.cuda.memory_reserved(self.dev)
        self.sync()
        t = time.perf_counter()
        batch = None
        if source == "prefetch":
            batch = next(self.ahead)  # batch i, prepared during step i - 1; batch i + 1 starts on the side stream
            x, matrix = self.transform(batch["image"], train=True, return_matrix=True)
        else:
            x, matrix = self.transform(self.pool[self.index[i]], train=True, return_matrix=True)  # (B, 3, S, S)
        rel = self.relevance(source, i, x, matrix, batch) if source else None  # (B, Gh, Gw)
        nbytes = [0]

        def pack(v):
            nbytes[0] += v.numel() * v.element_size()
            return v

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v) if count_saved else contextlib.nullcontext()
        with hooks, torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16):
            with guide.capture() if guide else contextlib.nullcontext():
                logits = net(self.transform.normalize(x))
            loss = F.cross_entropy(logits.float(), self.labels[i])
            if guide:
                loss = loss + guide.loss(rel, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.sync()
        dt = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(self.dev) if self.dev.type == "cuda" else 0
        grown = torch.cuda.memory_reserved(self.dev) - reserved if self.dev.type == "cuda" else 0
        return dt, peak, max(peak - before, 0), max(grown, 0), nbytes[0]

    def round(self, names: list[str]) -> dict[str, dict]:
        """Warm-up, timed steps and one untimed step counting saved-for-backward bytes, variants interleaved."""
        a = self.args
        times, saved = {k: [] for k in names}, {k: 0 for k in names}
        peak, extra, grown = {k: 0 for k in names}, {k: 0 for k in names}, {k: 0 for k in names}
        if "guided+prefetch" in names:
            self.ahead = self._prefetched()
        for i in range(a.warmup + a.steps + 1):
            for name in names:
                last = i == a.warmup + a.steps
                dt, pk, ex, gr, nb = self.step(name, i, count_saved=last)
                if i < a.warmup:
                    grown[name] += gr
                if last:
                    saved[name] = nb
                elif i >= a.warmup:
                    times[name].append(dt)
                    peak[name], extra[name] = max(peak[name], pk), max(extra[name], ex)
        med = {k: statistics.median(times[k]) for k in names}
        out = {}
        for k in names:
            v = {"step_ms": med[k] * 1000, "img_s": a.batch / med[k], "throughput_ratio": med["baseline"] / med[k],
                 "saved_for_backward_mib": saved[k] / 2**20, "saved_ratio": saved[k] / saved["baseline"],
                 "steps_ms": [t * 1000 for t in times[k]]}
            if self.dev.type == "cuda":  # peak: all variants' weights and optimizer states resident; step_peak: the
                # step's own memory above that (activations, gradients, SIFT), what guidance changes. A replayed
                # CUDA graph allocates nothing, so the detector's working memory in the graph variants is not in
                # these peaks: it is the graph's private pool, reserved when the graph is recorded (in warm-up):
                # warmup_reserved_mib, what the allocator reserved during the variant's warm-up steps
                v.update(peak_mib=peak[k] / 2**20, peak_ratio=peak[k] / peak["baseline"],
                         step_peak_mib=extra[k] / 2**20, step_peak_ratio=extra[k] / extra["baseline"],
                         warmup_reserved_mib=grown[k] / 2**20)
            out[k] = v
        return out


def print_round(title: str, variants: dict[str, dict], cuda: bool) -> None:
    print(title)
    mem = "peak allocated MiB (ratio)   step's own peak MiB (ratio)  warm-up reserved MiB" if cuda else ""
    print(f"  {'variant':15s} {'step ms':>9s} {'img/s':>9s} {'ratio':>6s}  "
          f"{'saved-for-backward MiB (ratio)':>31s}  {mem}")
    for k, v in variants.items():
        line = (f"  {k:15s} {v['step_ms']:9.1f} {v['img_s']:9.1f} {v['throughput_ratio']:6.3f}  "
                f"{v['saved_for_backward_mib']:22.1f} ({v['saved_ratio']:5.3f})")
        if cuda:
            line += (f"  {v['peak_mib']:18.0f} ({v['peak_ratio']:5.3f})  {v['step_peak_mib']:18.0f} "
                     f"({v['step_peak_ratio']:5.3f})  {v['warmup_reserved_mib']:20.0f}")
        print(line)


def steps_part(args, dev, sync, report: Report, clock: Stopwatch) -> None:
    """Round 1: baseline, guided on the fly (eager, graph, prefetch), guided with the caches (in memory, folder
    rows). Round 2 (when the budget allows a compile): baseline again and guided on the fly with the compiled
    detector, so its ratio has its own baseline."""
    a = args
    print(f"\n== part 2: training steps, {a.model} at {a.img_size} px, batch {a.batch}, bf16 autocast, AdamW, "
          f"{a.steps} timed steps per variant after {a.warmup} warm-up, interleaved ({dev})")
    bench = StepBench(args, dev, sync)
    cache_s = bench.build_cache()
    res = {
        "model": a.model, "img_size": a.img_size, "batch": a.batch, "dtype": "bf16 autocast",
        "patch": list(bench.patch), "grid": list(bench.grid), "pool_images": len(bench.pool),
        "pool_source": bench.pool_source, "sift": bench.sift_kw, "guidance": {"layers": [-1], "weight": 0.3},
        "augmentation": "resize, RandomResizedCrop(scale 0.35-1, ratio 3/4-4/3), horizontal flip (kornia)",
        "timed_steps": a.steps, "warmup_steps": a.warmup, "cache_build_s": cache_s,
        "cache_build_img_s": len(bench.pool) / cache_s,
        "variants": bench.round(["baseline", "guided", "guided+graph", "guided+prefetch", "guided+cache",
                                 "guided+folder"]),
        "compiled": None, "compile_s": None, "compile_skipped": "not run yet",
    }
    report.data["steps"] = res
    report.save()
    print_round("  round 1 (SIFT on the fly: eager, graph, prefetch; caches):", res["variants"], dev.type == "cuda")
    n = len(bench.pool)
    print(f"  keypoint cache built for {n} images in {cache_s:.2f} s ({n / cache_s:.0f} img/s)")

    reason = clock.compile_veto(a)
    if reason is None:
        torch._dynamo.reset()
        try:
            res["compile_s"] = bench.compile_detector()
        except Exception as e:  # noqa: BLE001 - reported; the other parts still run
            reason = f"compile failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    if reason is None:
        clock.last_compile_s = res["compile_s"]
        print(f"  detector compiled for ({a.batch}, 3, {a.img_size}, {a.img_size}) in {res['compile_s']:.0f} s")
        res["compiled"] = bench.round(["baseline", "guided+compile"])
        print_round("  round 2 (compiled SIFT, its own baseline):", res["compiled"], dev.type == "cuda")
    res["compile_skipped"] = reason
    report.save()
    if reason:
        print(f"  guided+compile skipped: {reason}")


# ------------------------------------------------------------------------------------------ part 3: folder cache
def folder_part(args, dev, sync, report: Report) -> None:
    """Build the folder cache of a generated folder of 224 px JPEGs as a training run does (loader workers decode,
    the detector runs on ``dev``): images/s and bytes per image (first build), and the time a later run's check
    takes."""
    import tempfile

    from bench.folder_cache import generate
    from siftguide.data import ImageFolderDataModule
    from siftguide.relevance.folder_cache import FolderKeypointCache

    size = 224 if not args.smoke else 64
    print(f"\n== part 3: folder cache of {args.folder_images} JPEGs ({size} px), {args.folder_workers} loader workers, "
          f"detector on {dev}")
    with tempfile.TemporaryDirectory(prefix="siftguide-gpu-bench-") as tmp:
        root = Path(tmp) / "folder"
        t0 = time.perf_counter()
        generate(root, args.folder_images, size, val=10)
        gen_s = time.perf_counter() - t0
        dm = ImageFolderDataModule(str(root), img_size=size, num_workers=args.folder_workers, in_chans=3,
                                   num_classes=10)
        dm.setup()
        transform = DeviceTransform(size).to(dev)
        sift = dict(max_keypoints=512)
        sync()
        t0 = time.perf_counter()
        cache = FolderKeypointCache.prepare(dm.train_set, transform.resize, sift, transform.size, Path(tmp) / "cache",
                                            device=dev, batch_size=args.batch, num_workers=args.folder_workers,
                                            progress=False)
        sync()
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        FolderKeypointCache.prepare(dm.train_set, transform.resize, sift, transform.size, Path(tmp) / "cache",
                                    device=dev, progress=False)
        check_s = time.perf_counter() - t0
        n, nbytes = len(cache), cache.disk_bytes()
    res = {"images": n, "size": size, "max_keypoints": 512, "workers": args.folder_workers, "generate_s": gen_s,
           "build_s": build_s, "build_img_s": n / build_s, "bytes_per_image": nbytes / n,
           "gb_per_million": nbytes / n * 1e6 / 1e9, "hours_per_million": 1e6 / (n / build_s) / 3600,
           "reuse_check_s": check_s}
    report.data["folder_cache"] = res
    report.save()
    print(f"  built in {build_s:.1f} s: {res['build_img_s']:.0f} img/s ({res['hours_per_million']:.2f} h per million "
          f"images), {res['bytes_per_image']:.0f} B/image ({res['gb_per_million']:.2f} GB per million); a later run's "
          f"check: {check_s:.2f} s")


def targets(report: Report) -> None:
    """Issue 21's GPU targets, from this run's numbers (None where not measured)."""
    d = report.data
    sift224 = next((r for r in d["sift"] if r["size"] == 224), {})
    best = max((v for v in (sift224.get("graph_img_s"), sift224.get("compiled_img_s"), sift224.get("eager_img_s"))
                if v), default=None)
    var = (d.get("steps") or {}).get("variants") or {}
    on_the_fly = max((var[k]["throughput_ratio"] for k in ("guided+graph", "guided+prefetch") if k in var),
                     default=None)
    folder = var.get("guided+folder", {}).get("throughput_ratio")
    t = {"detector_224_img_s": best, "detector_target": 30000, "on_the_fly_ratio": on_the_fly,
         "on_the_fly_target": 0.90, "folder_cache_ratio": folder, "folder_cache_target": 0.95}
    d["targets"] = t
    report.save()
    print("\n== targets (issue 21): detector at 224 px, batch 256: "
          f"{fmt(best, '.0f')} img/s (>= 30,000); guided/baseline on the fly {fmt(on_the_fly, '.3f')} (>= 0.90); "
          f"with the folder cache {fmt(folder, '.3f')} (>= 0.95)")


# ---------------------------------------------------------------------------------- part 4: self-distillation
def ssl_part(args, dev, sync, report: Report) -> None:
    """DINO and iBOT (block, SIFT and teacher-attention masks) beside the supervised baseline: step-rate ratio and
    activation memory, from ``bench/throughput.py --ssl`` on this device (the run's own module, at the 64 px
    Fashion-MNIST config). Not in ``--smoke``."""
    if args.smoke:
        print("\nself-distillation: skipped with --smoke")
        return
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--ssl", "--device", str(dev),
                           "--steps", str(args.ssl_steps), "--modes", "prior", "data.train_subset=4096"],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    print("\nself-distillation (bench/throughput.py --ssl):\n" + "\n".join(lines[-12:]))
    report.data["ssl"] = {"returncode": proc.returncode, "lines": lines, "stderr_tail": proc.stderr[-2000:]}
    report.save()


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, no compile (the tests)")
    ap.add_argument("--out", help="JSON file for all numbers (rewritten after every part)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd detector")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="no compile starts later than this minus its expected duration")
    ap.add_argument("--compile-estimate-s", type=float, default=300.0,
                    help="expected seconds per compile of the detector (282 s measured on an H200 at the step shape)")
    ap.add_argument("--hard-limit-s", type=float, default=None,
                    help="exit (status 3, results so far kept) after this many seconds; default 450, off with --smoke")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sift", "steps", "folder", "ssl"],
                    help="parts to leave out")
    ap.add_argument("--ssl-steps", type=int, default=10, help="timed steps per variant of the self-distillation part")
    for k, v in FULL.items():  # sizes default to the full run, or to the smoke run with --smoke
        kw = dict(type=int, nargs="+") if isinstance(v, list) else dict(type=type(v) if v is not None else int)
        ap.add_argument("--" + k.replace("_", "-"), default=None, **kw)
    args = ap.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.smoke:
        args.no_compile = True
    if args.hard_limit_s is None:
        args.hard_limit_s = 0.0 if args.smoke else 450.0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    clock = Stopwatch(args.budget_s)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report = Report(args.out, meta(args, dev))
    m = report.data["meta"]
    print(f"{m['device_name']} ({dev}), torch {m['torch']} (CUDA {m['cuda']}), timm {m['timm']}, kornia {m['kornia']}, "
          f"OpenCV {m['opencv']} ({m.get('opencv_threads')} threads), {m['cpu_count']} CPUs, "
          f"torch threads {m['torch_threads']}")
    report.save()
    if args.hard_limit_s > 0:  # a compile cannot be interrupted: end the process, keeping what was measured
        def cut() -> None:
            print(f"\nhard limit of {args.hard_limit_s:.0f} s reached: exiting with the results so far", flush=True)
            report.data["status"] = f"cut at {args.hard_limit_s:.0f} s"
            report.save()
            os._exit(3)

        watchdog = threading.Timer(args.hard_limit_s, cut)
        watchdog.daemon = True
        watchdog.start()
    errors = report.data["errors"] = []

    def attempt(part: str, fn, *a):
        """Run one part; an exception is printed and recorded, and the next part still runs."""
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            errors.append(f"{part}: {type(e).__name__}: {e}")
            report.save()
            return None

    batches = attempt("sift", sift_part, args, dev, sync, report) if "sift" not in args.skip else None
    if "steps" not in args.skip:
        attempt("steps", steps_part, args, dev, sync, report, clock)
    if "folder" not in args.skip:
        attempt("folder", folder_part, args, dev, sync, report)
    if "ssl" not in args.skip:
        attempt("ssl", ssl_part, args, dev, sync, report)
    if batches:
        attempt("sift compiled", sift_compiled_part, args, dev, sync, report, batches, clock)
    targets(report)
    report.data["status"] = "complete" if not errors else "errors"
    report.data["elapsed_s"] = clock.elapsed()
    report.save()
    print(f"\ndone in {clock.elapsed():.0f} s" + (f"; numbers in {args.out}" if args.out else ""))
    if errors:
        raise SystemExit("parts failed: " + "; ".join(errors))
    return report.data


if __name__ == "__main__":
    main()
