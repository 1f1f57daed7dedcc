"""Token dropping and the keypoint-weighted MAE loss in a plain PyTorch loop (no Lightning, no Hydra).

    python examples/plugin_modes.py [--steps 3]

Part 1 trains a supervised timm ViT on only the most SIFT-relevant half of its patch tokens; part 2 trains a
masked autoencoder whose reconstruction loss is weighted by keypoint density (KAMIM). The siftguide lines are
marked with ``# <-``.
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

from examples.plain_pytorch import batches
from siftguide import patch_relevance
from siftguide.guidance import KeypointReconWeight, TokenDrop
from siftguide.objectives import Guided, MAEObjective, encode


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    kw = dict(pretrained=False, img_size=64, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=2)

    # 1. token dropping: the blocks see the 50 % most relevant patch tokens of each image
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kw)
    drop = TokenDrop(model, keep_ratio=0.5)                              # <-
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _, (images, labels) in zip(range(args.steps), batches(32, 64)):
        rel = patch_relevance(images, patch_size=8)                     # <- (B, 8, 8) SIFT relevance
        ids = drop.select_tokens(rel, step=0)                           # <- (B, 32) kept patch indices
        logits = model.forward_head(encode(model, (images - 0.5) / 0.5, ids))  # <- shortened sequence
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(); loss.backward(); opt.step()  # noqa: E702
    task = float(loss)

    # 2. MAE with KAMIM's keypoint-weighted reconstruction loss (any timm ViT as the encoder)
    encoder = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kw)
    mae = MAEObjective(mask_ratio=0.75, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    mae.setup(encoder)
    weighting = KeypointReconWeight(temperature=0.25)                   # <- weights the masked-patch loss
    opt = torch.optim.AdamW([*encoder.parameters(), *mae.parameters()], lr=1e-3)
    for _, (images, _) in zip(range(args.steps), batches(32, 64)):
        rel = patch_relevance(images, patch_size=8)                     # <-
        out = mae(encoder, (images - 0.5) / 0.5, {}, "train", Guided(None, *weighting.patch_weights(rel, 0)))  # <-
        opt.zero_grad(); out.loss.backward(); opt.step()  # noqa: E702
    print(f"token-dropped task loss {task:.4f}, keypoint-weighted MAE loss {float(out.loss):.4f}")
    return {"task": task, "mae": float(out.loss), "kept": ids.shape[1]}


if __name__ == "__main__":
    main()
