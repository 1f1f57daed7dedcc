"""Cost of attention capture: forward+backward of a timm ViT with guided blocks vs without, in one run.

    python bench/capture.py [--device cpu|cuda] [--repeats 10]

Guided = the plugin's capture (guided blocks on timm's explicit attention path) + the guidance loss; unguided =
the plain model (fused SDPA everywhere). Same weights, inputs and task loss; SIFT is not included (see
bench/throughput.py for whole training steps). Memory: bytes saved for backward (exact on any device) and, on
CUDA, peak allocated memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from siftguide import AttentionAlignment

CASES = {
    "default (vit 6x128, 64 px, patch 8, batch 128)": (dict(model_name="vit_tiny_patch16_224", img_size=64,
                                                             patch_size=8, embed_dim=128, depth=6, num_heads=4,
                                                             in_chans=1, num_classes=10), 128, 64, 1),
    "ViT-S/16 (224 px, batch 16)": (dict(model_name="vit_small_patch16_224", num_classes=10), 16, 224, 3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layers", type=int, nargs="+", default=[-1])
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    print(f"device {dev}, threads {torch.get_num_threads()}, guided layers {args.layers}")
    for name, (kw, batch, size, chans) in CASES.items():
        torch.manual_seed(0)
        model = timm.create_model(pretrained=False, **kw).to(dev)
        x = torch.randn(batch, chans, size, size, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        grid = model.patch_embed.grid_size
        rel = torch.rand(batch, *grid, device=dev)
        rel = rel / rel.flatten(1).sum(1).view(-1, 1, 1)
        guide = AttentionAlignment(model, layers=args.layers, weight=0.3)

        def step(guided: bool) -> tuple[float, int]:
            saved = [0]

            def pack(t):
                saved[0] += t.numel() * t.element_size()
                return t

            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if guided:
                    with guide.capture():
                        loss = F.cross_entropy(model(x), y)
                    loss = loss + guide.loss(rel, 0)
                else:
                    loss = F.cross_entropy(model(x), y)
            loss.backward()
            model.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - t0, saved[0]

        times = {True: [], False: []}
        mem = {True: 0, False: 0}
        peak = {True: 0, False: 0}
        for i in range(args.repeats + 2):
            for guided in (False, True):  # interleaved
                t, s = step(guided)
                if i >= 2:
                    times[guided].append(t)
                    mem[guided] = max(mem[guided], s)
                    if dev.type == "cuda":
                        peak[guided] = max(peak[guided], torch.cuda.max_memory_allocated())
        tg, tu = statistics.median(times[True]), statistics.median(times[False])
        print(f"\n{name}")
        print(f"  fwd+bwd median: unguided {tu * 1000:.1f} ms, guided {tg * 1000:.1f} ms -> time ratio {tg / tu:.3f}")
        print(f"  saved for backward: unguided {mem[False] / 2**20:.1f} MiB, guided {mem[True] / 2**20:.1f} MiB "
              f"-> ratio {mem[True] / mem[False]:.3f}")
        if dev.type == "cuda":
            print(f"  peak allocated: ratio {peak[True] / peak[False]:.3f}")


if __name__ == "__main__":
    main()
