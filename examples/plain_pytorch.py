"""SIFT guidance in a plain PyTorch loop on any timm ViT (no Lightning, no Hydra).

    python examples/plain_pytorch.py [--steps 30] [--model vit_tiny_patch16_224]

Trains on Fashion-MNIST upsampled to 64 px when available (else on random shapes), printing task and
guidance losses. The three siftguide lines are marked with ``# <-``.
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

from siftguide import AttentionAlignment, patch_relevance


def batches(batch_size: int, size: int):
    try:
        from siftguide.data import load_fashion_mnist

        x, y = load_fashion_mnist(split="train", download=False)
    except RuntimeError:  # no data on this machine: bright rectangles, label = which quadrant
        x = torch.zeros(2048, 1, 28, 28, dtype=torch.uint8)
        y = torch.randint(0, 4, (2048,))
        for i, q in enumerate(y.tolist()):
            r, c = divmod(q, 2)
            x[i, 0, 2 + 12 * r : 12 + 12 * r, 2 + 12 * c : 12 + 12 * c] = 255
    g = torch.Generator().manual_seed(0)
    while True:
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        img = F.interpolate(x[idx].float() / 255, size=size, mode="bilinear", align_corners=False)
        yield img, y[idx]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--weight", type=float, default=0.3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10, in_chans=1, img_size=64, patch_size=8,
                              depth=4)
    guide = AttentionAlignment(model, layers=[-1], weight=args.weight)  # <- attach the plugin
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    data = batches(64, 64)
    logged = {"task": [], "guidance": []}
    for step in range(args.steps):
        images, labels = next(data)
        rel = patch_relevance(images, patch_size=8, max_keypoints=64)  # <- (B, 8, 8) SIFT relevance
        with guide.capture():  # <- attention of the guided block is recorded in here
            logits = model((images - 0.5) / 0.5)
        task = F.cross_entropy(logits, labels)
        g = guide.loss(rel, step=step)  # <- weight * KL(relevance || CLS attention)
        (task + g).backward()
        logged["task"].append(float(task))
        logged["guidance"].append(float(g))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  task {task.item():.3f}  guidance {g.item():.3f}")
    guide.detach()  # the model is exactly as timm built it (fused attention everywhere)
    return {**logged, "model": model}


if __name__ == "__main__":
    main()
