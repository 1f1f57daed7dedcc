"""Training throughput and memory of every guidance mode vs the baseline at the default config, in one run.

    python bench/throughput.py [--steps 20] [--device cpu|cuda] [--compile] [overrides ...]

Builds the real objects from the composed Hydra config (``configs/train.yaml`` + overrides) and runs optimizer
steps by hand (device pipeline, relevance, forward, backward, AdamW step), interleaving the variants
baseline / attention guidance on the fly / every supervised mode with the keypoint cache (attention,
interrelation, background, prior, token_drop, token_drop's random control, token_drop with a per-image budget)
(/ on the fly with the ``torch.compile``'d detector, ``--compile``; compiled during the warm-up steps) so that
machine drift hits all alike (``--ssl``: DINO, iBOT, iBOT with SIFT masks, the teacher's attention, guided crops).
Prints the median step time, images/s, the guided/baseline throughput ratios, and memory: bytes of tensors saved for
backward (the activation memory, exact on any device) and, on CUDA, the peak allocated memory. With OpenCV
installed it also times OpenCV's C++ SIFT on one augmented batch: the on-the-fly ratio a detector as fast as
OpenCV's would give, a bound for this machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_module(overrides: list[str], device: torch.device):
    from siftguide.train import build_module

    with initialize_config_dir(config_dir=str(ROOT / "siftguide" / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=["paths.output_dir=/tmp/siftguide-bench", "logger=csv", *overrides])
    torch.manual_seed(0)
    return cfg, build_module(cfg).to(device)


def opencv_detect_seconds(module, batch: dict, dev: torch.device, repeats: int = 3) -> float | None:
    """Best-of-``repeats`` seconds OpenCV's ``SIFT.detect`` (C++, CPU) takes on one augmented training batch,
    image by image, timed as ``bench/sift.py`` times it; None without OpenCV (a dev dependency)."""
    try:
        import cv2
    except ImportError:
        return None
    from bench.sift import timeit
    from siftguide.relevance import rgb_to_gray

    with torch.no_grad():
        x = module.transform(batch["image"].to(dev), train=True)
    u8 = (rgb_to_gray(x.float()) * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    sift = cv2.SIFT_create()
    return timeit(lambda: [sift.detect(im[0], None) for im in u8], repeats, lambda: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="add guided on the fly with the compiled detector")
    ap.add_argument("--modes", nargs="*", default=None, help="only these mode variants (default: all)")
    ap.add_argument("--ssl", action="store_true",
                    help="add self-distillation: DINO, iBOT with block masks, with SIFT masks (attmask, cached "
                         "keypoints) and with the teacher's attention (AttMask), experiment=ibot_fm's settings")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    from siftguide.relevance import KeypointCache

    C = "relevance.cache=true"
    variants = {
        "baseline": ["guidance=none"],
        "guided": ["guidance=attention", "relevance.cache=false"],  # SIFT on the fly
        "guided+cache": ["guidance=attention", C],
        "interrelation": ["guidance=interrelation", C],
        "background": ["guidance=background", C],
        "prior": ["guidance=prior", C],
        "token_drop": ["guidance=token_drop", C],
        "token_drop_rand": ["guidance=token_drop", "relevance.kind=random", "relevance.cache=false"],
        "token_drop_budget": ["guidance=token_drop", "guidance.token_drop.budget=entropy", C],  # rows of 0.75 P
    }
    if args.modes:
        variants = {k: v for k, v in variants.items() if k in ("baseline", "guided", "guided+cache", *args.modes)}
    if args.compile:
        variants["guided+compile"] = ["guidance=attention", "relevance.cache=false", "relevance.backend=compile"]
    if args.ssl:
        variants.update({"dino": ["experiment=dino_fm"], "ibot": ["experiment=ibot_fm"],
                         "ibot+sift": ["experiment=ibot_fm", "guidance=attmask", C],
                         "ibot+attention": ["experiment=ibot_fm", "objective.mask_pattern=attention"],
                         "ibot+crops": ["experiment=ibot_fm", "transform.guided_crops=0.5", C]})
    built = {k: make_module(args.overrides + v, dev) for k, v in variants.items()}
    cfg = built["baseline"][0]
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup()
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    # the cache is built once, outside the timed steps (as in training, where it is built or loaded at fit start)
    cm = built["guided+cache"][1]
    t0 = time.perf_counter()
    cache = KeypointCache.build(dm.train_set.images, cm.transform.resize, cm.relevance.sift, device=dev).to(dev)
    build_s = time.perf_counter() - t0
    for _, m in built.values():
        if m.relevance.use_cache == "true":
            m.relevance.caches["train"] = cache
        m.train()

    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, (_, m) in built.items()}
    times = {k: [] for k in built}
    saved = {k: 0 for k in built}
    peak = {k: 0 for k in built}

    def step(name: str, batch: dict, measure: bool) -> None:
        m = built[name][1]
        m.train()
        b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        b = m.on_after_batch_transfer(b, 0)
        nbytes = [0]

        def pack(x):
            nbytes[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = m.training_step(b, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        m.on_train_batch_end(out, b, 0)  # an EMA teacher's update (self-distillation) is part of the step
        sync()
        if measure:
            times[name].append(time.perf_counter() - t)
            saved[name] = max(saved[name], nbytes[0])
            if dev.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())

    for i, batch in enumerate(batches):
        for name in built:  # interleaved
            step(name, batch, measure=i >= args.warmup)

    bs = batches[0]["image"].shape[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {dev}, threads {torch.get_num_threads()}, batch {bs}, {args.steps} timed steps per variant, "
          f"overrides {args.overrides or '(default config)'}")
    print(f"keypoint cache built for {len(cache)} training images in {build_s:.1f} s")
    for k in built:
        line = f"{k:16s} median step {med[k] * 1000:8.1f} ms  {bs / med[k]:8.1f} img/s  saved-for-backward " \
               f"{saved[k] / 2**20:7.1f} MiB"
        if dev.type == "cuda":
            line += f"  peak allocated {peak[k] / 2**20:8.1f} MiB"
        print(line)
    print(f"throughput ratio guided/baseline (on the fly): {med['baseline'] / med['guided']:.3f}")
    print(f"throughput ratio guided/baseline (cached):     {med['baseline'] / med['guided+cache']:.3f}")
    if args.compile:
        print(f"throughput ratio guided/baseline (compiled):   {med['baseline'] / med['guided+compile']:.3f}")
    print(f"activation memory ratio guided/baseline:       {saved['guided'] / saved['baseline']:.3f}")
    print("per mode (cached relevance), throughput and activation-memory ratios to the baseline:")
    for k in built:
        if k not in ("baseline", "guided", "guided+compile"):
            print(f"  {k:16s} throughput {med['baseline'] / med[k]:.3f}   memory {saved[k] / saved['baseline']:.3f}")
    cv_s = opencv_detect_seconds(built["baseline"][1], batches[0], dev)
    if cv_s is not None:  # what no detector in the step can beat on this CPU: OpenCV's C++ SIFT
        print(f"OpenCV SIFT.detect on the same {bs} augmented images: {cv_s * 1000:.1f} ms; on-the-fly ratio if "
              f"detection cost only that: {med['baseline'] / (med['baseline'] + cv_s):.3f}")
    if dev.type == "cuda":
        print(f"peak memory ratio guided/baseline (on the fly):  {peak['guided'] / peak['baseline']:.3f}")
        print(f"peak memory ratio guided/baseline (cached):      {peak['guided+cache'] / peak['baseline']:.3f}")


if __name__ == "__main__":
    main()
