"""``AttentionMonitor``: watch attention/SIFT agreement during training (``callbacks=[default,attention_monitor]``).

Every ``every_n_steps`` optimizer steps the callback runs the network (eval mode, no gradients) on a fixed set of
images, the first ``num_images`` of the validation split, and logs to every logger, per monitored block ``L``:

* ``monitor/kl_l{L}``: ``KL(r || c)`` from the SIFT relevance ``r`` to the class token's attention ``c``;
* ``monitor/spearman_l{L}``: Spearman's rank correlation of ``r`` and ``c`` (images with a constant ``r`` skipped);
* ``monitor/poor_share_l{L}``: the share of ``c`` on keypoint-free patches (a rising share is attention drifting
  to what SIFT calls background: the spurious-feature signal of :mod:`siftguide.analysis.analyze`).

Each is the mean over images of the head-mean of :class:`~siftguide.analysis.interrelation.InterrelationStats`'s
per-head values, so the numbers are those of ``python -m siftguide.analysis.analyze`` on the same images. With a
``WandbLogger`` the callback also logs ``monitor/overlays`` (image + keypoints, attention, keypoints per patch) of
the first ``overlays`` images of the last monitored block. Keypoints and relevance are computed once, at the
start of fitting, on the un-augmented images at the model's input size, with the run's relevance settings.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch import Tensor

from ..attention import AttentionCapture, prefix_tokens
from ..relevance import relevance_from_keypoints
from ..relevance import Keypoints, counts_from_keypoints, detect_keypoints
from .interrelation import InterrelationStats
from .plots import plot_overlays

log = logging.getLogger(__name__)

__all__ = ["AttentionMonitor"]

_FIXED = (1, 2)  # bins 0 / 1 / 2+ keypoints: bin 0 is "keypoint-free"


class AttentionMonitor(L.Callback):
    """Args: every_n_steps (optimizer steps between measurements); layers (blocks, negative from the end);
    num_images (first validation images, fixed for the whole run); overlays (images in the wandb figure, 0: none).
    """

    def __init__(self, every_n_steps: int = 100, layers: Sequence[int] = (-1,), num_images: int = 64,
                 overlays: int = 4) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.attention_monitor.every_n_steps must be >= 1, got {every_n_steps}")
        if num_images < 1:
            raise ValueError(f"callbacks.attention_monitor.num_images must be >= 1, got {num_images}")
        if overlays < 0:
            raise ValueError(f"callbacks.attention_monitor.overlays must be >= 0, got {overlays}")
        self.every_n_steps, self.layer_spec = int(every_n_steps), list(layers)
        self.num_images, self.overlays = int(num_images), int(overlays)
        self.images: Tensor | None = None  # (n, C, H, W) in [0, 1] at the model's size
        self.keypoints: Keypoints | None = None
        self.counts: Tensor | None = None  # (n, P)
        self.relevance: Tensor | None = None  # (n, P)
        self.capture: AttentionCapture | None = None
        self._last_step = -1

    # ------------------------------------------------------------------ set-up: the fixed images, once
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None:
            raise ValueError("attention_monitor needs a datamodule (trainer.fit(module, datamodule=...))")
        if getattr(dm, "val_set", None) is None:
            dm.setup("fit")
        ds = getattr(dm, "val_set", None)
        if ds is None or len(ds) == 0:
            raise ValueError(f"attention_monitor: {type(dm).__name__} has no validation images to monitor")
        n = min(self.num_images, len(ds))
        from ..data.protocol import take

        raw = take(ds, range(n))[0]
        net = pl_module.net
        self.capture = AttentionCapture(net, layers=self.layer_spec)
        x = pl_module.transform.resize(raw.to(pl_module.device))  # the un-augmented validation input, [0, 1]
        ph, pw = (int(s) for s in net.patch_embed.patch_size)
        grid = (x.shape[-2] // ph, x.shape[-1] // pw)
        src = pl_module.relevance  # the run's detector and relevance settings, SIFT whatever the run's kind
        self.keypoints = detect_keypoints(x, **src.sift)
        self.counts = counts_from_keypoints(self.keypoints, grid, (ph, pw)).flatten(1)
        self.relevance = relevance_from_keypoints(self.keypoints, grid, (ph, pw), mode=src.mode, splat=src.splat,
                                                  **src.norm).flatten(1)
        self.images, self.grid = x, grid
        self._attn_kind = "CLS" if prefix_tokens(net)["cls_index"] >= 0 else "mean received"
        log.info("attention monitor: %d validation images, blocks %s, every %d steps", n, self.capture.layers,
                 self.every_n_steps)

    # ------------------------------------------------------------------ measurement
    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule) -> tuple[dict[str, float], Tensor]:
        """The metrics of the current weights, and the last monitored block's head-mean CLS attention ``(n, P)``."""
        net = pl_module.net
        was_training = net.training
        pt = prefix_tokens(net)
        stats = InterrelationStats(self.capture.layers, net.blocks[0].attn.num_heads, self.grid, pt["num_prefix"],
                                   pt["cls_index"])
        net.eval()
        try:
            with self.capture.capture():
                net(pl_module.transform.normalize(self.images))
            cls = stats.update(self.capture.maps, self.counts, self.relevance)
        finally:
            self.capture.clear()
            net.train(was_training)
        res = stats.result(_FIXED)
        metrics = {}
        for i, layer in enumerate(stats.layers):
            metrics[f"monitor/kl_l{layer}"] = float(res["kl"][i].mean())
            metrics[f"monitor/spearman_l{layer}"] = float(res["spearman"][i].nanmean())
            metrics[f"monitor/poor_share_l{layer}"] = float(res["cls_share"][i, :, 0].mean())
        return metrics, cls[stats.layers[-1]].mean(1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # global_step counts optimizer steps; with gradient accumulation it repeats across batches: once per step
        if step == self._last_step or step % self.every_n_steps or not trainer.is_global_zero:
            return
        self._last_step = step
        metrics, attn = self.measure(pl_module)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        wandb = [lg for lg in trainer.loggers if isinstance(lg, L.pytorch.loggers.WandbLogger)]
        if wandb and self.overlays:
            self._log_overlays(wandb, attn, step)

    def _log_overlays(self, loggers, attn: Tensor, step: int) -> None:
        k = min(self.overlays, attn.shape[0])
        from PIL import Image

        kp = Keypoints(**{f.name: getattr(self.keypoints, f.name)[:k].cpu() for f in dataclasses.fields(Keypoints)})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "overlays.png"
            plot_overlays(self.images[:k].cpu(), kp, attn[:k].cpu(), self.counts[:k].cpu(), self.grid,
                          [f"val #{i} (step {step})" for i in range(k)], f"{self._attn_kind} attn, layer "
                          f"{self.capture.layers[-1]}", path)
            with Image.open(path) as im:
                image = im.convert("RGB")  # loaded before the temporary file goes
        for lg in loggers:
            lg.log_image(key="monitor/overlays", images=[image], step=step)
