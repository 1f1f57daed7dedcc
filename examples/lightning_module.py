"""SIFT guidance inside an existing LightningModule: three additions to your own module.

    python examples/lightning_module.py [--steps 20]

Your module keeps its training step; it (1) builds ``AttentionAlignment`` in ``__init__``, (2) computes the relevance on
the device in ``on_after_batch_transfer`` and (3) wraps its forward in ``guide.capture()`` and adds
``guide.loss``.
"""
from __future__ import annotations

import argparse

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from siftguide import AttentionAlignment
from siftguide.relevance import RelevanceStage


class MyClassifier(L.LightningModule):
    """A user's existing module (simplified)."""

    def __init__(self, weight: float = 0.3) -> None:
        super().__init__()
        self.net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, in_chans=1,
                                     img_size=64, patch_size=8, depth=3)
        self.guide = AttentionAlignment(self.net, layers=[-1], weight=weight)  # (1)
        self.target = RelevanceStage(sift=dict(max_keypoints=64))

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, labels = batch
        rel, _ = self.target(images, patch_size=8)  # (2) SIFT on the device, no grad (and what it measured)
        return images, labels, rel

    def training_step(self, batch, batch_idx):
        images, labels, rel = batch
        with self.guide.capture():  # (3)
            logits = self.net((images - 0.5) / 0.5)
        task = F.cross_entropy(logits, labels)
        g = self.guide.loss(rel, step=self.global_step)
        self.log_dict({"task": task, "guidance": g}, prog_bar=True)
        return task + g

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=5e-4)


def shapes_dataset(n: int = 512) -> TensorDataset:
    """Bright squares in one of four quadrants of a 64 px image; the label is the quadrant."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.full((n, 1, 64, 64), 0.1)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, 0, 6 + 32 * r : 26 + 32 * r, 6 + 32 * c : 26 + 32 * c] = 0.9
    return TensorDataset(x, y)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="auto", devices=1)
    module = MyClassifier()
    trainer.fit(module, DataLoader(shapes_dataset(), batch_size=32, shuffle=True))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()
