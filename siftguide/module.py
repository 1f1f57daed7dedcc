"""``PretrainModule``: one LightningModule that owns the training step of any objective, with optional guidance.

Per training batch (already on the device):

1. ``on_after_batch_transfer``: :class:`~siftguide.data.DeviceTransform` (resize + kornia augmentation) and, when
   guidance is active, the relevance target of the augmented images (SIFT on the device, no grad);
2. ``training_step``: objective forward inside ``guidance.capture()``; loss = task loss + guidance loss.

Logged: ``train/loss``, ``train/task_loss``, ``train/guidance_loss`` (weighted term, guided runs only),
``train/guidance_div`` (unweighted divergence), ``train/acc`` (supervised), ``train/lr``, ``val/loss``,
``val/acc``, and ``val/attn_div``: the divergence between the guided layers' attention and SIFT relevance on a
few validation batches, logged for baselines too, so alignment can be compared across runs.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn

from .cache import KeypointCache
from .data import DeviceTransform
from .guidance import SiftGuidance
from .relevance import RelevanceTarget

__all__ = ["PretrainModule", "warmup_cosine"]


def warmup_cosine(warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_steps``, cosine decay to ``min_factor`` at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float().mean()


class PretrainModule(L.LightningModule):
    """Pre-train a timm ViT with an objective and optional SIFT guidance.

    Args:
        net: the timm ViT.
        objective: callable ``objective(net, images, batch) -> dict(loss, logits?, features?, ids_keep?)``.
        transform: the device-side pipeline.
        guidance: kwargs of :class:`SiftGuidance` (``weight``, ``layers``, ``heads``, ``attention``,
            ``divergence``, ``schedule``).
        target: the relevance target module (SIFT or a control).
        optimizer: partial ``torch.optim`` constructor taking the parameter groups.
        warmup_steps / min_lr_factor: LR schedule (per optimizer step, over ``trainer.max_steps``).
        align_batches: validation batches on which ``val/attn_div`` is measured (0 disables).
        cache: detect keypoints once per training image (:class:`~siftguide.cache.KeypointCache`, kept in
            ``cache_dir`` when given) and map them through each batch's augmentation instead of detecting.
        config: resolved run config, stored in checkpoints.
    """

    def __init__(
        self, net: nn.Module, objective: nn.Module, transform: DeviceTransform, guidance: dict[str, Any],
        target: RelevanceTarget, optimizer: Callable[..., torch.optim.Optimizer], warmup_steps: int = 0,
        min_lr_factor: float = 0.0, align_batches: int = 2, cache: bool = False, cache_dir: str | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config or {}})
        self.net = net
        self.objective = objective
        if hasattr(objective, "setup"):
            objective.setup(net)  # objectives with their own parameters (MAE decoder, probe) build them here
        self.transform = transform
        self.target = target
        self.guidance = SiftGuidance(net, **guidance)
        self.patch_size = tuple(net.patch_embed.patch_size)
        self.optimizer_fn = optimizer
        self.warmup_steps, self.min_lr_factor = warmup_steps, min_lr_factor
        self.align_batches = align_batches
        self.use_cache, self.cache_dir = cache, cache_dir
        self.keypoint_cache: KeypointCache | None = None

    def on_fit_start(self) -> None:
        if not (self.use_cache and self.guidance.active and self.target.uses_keypoints):
            return
        dm = self.trainer.datamodule
        images = getattr(getattr(dm, "train_set", None), "images", None)
        if images is None:
            raise ValueError(
                "guidance.cache=true needs a datamodule whose train_set holds its images in memory "
                "(Fashion-MNIST); with random crops on CPU workers (image_folder) use guidance.cache=false"
            )
        self.keypoint_cache = KeypointCache.load_or_build(
            images, self.transform.resize, self.target.sift, self.transform.size, self.cache_dir,
            device=self.device,
        ).to(self.device)

    # ------------------------------------------------------------------ data on the device
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        training = self.trainer.training if self._trainer is not None else self.training
        batch = dict(batch)
        batch["image"], matrix = self.transform(batch["image"], train=training, return_matrix=True)
        if training and self.guidance.active:
            kp = None
            if self.keypoint_cache is not None:
                kp = self.keypoint_cache.lookup(batch["index"], matrix, self.transform.size)
            batch["relevance"] = self.target(batch["image"], self.patch_size, keypoints=kp)
        return batch

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = self.transform.normalize(batch["image"])
        with self.guidance.capture():
            out = self.objective(self.net, images, batch)
        task = out["loss"]
        bs = images.shape[0]
        self.log("train/task_loss", task, batch_size=bs)
        for k, v in out.get("extra", {}).items():
            self.log(f"train/{k}", v, batch_size=bs)
        loss = task
        if self.guidance.active:
            g, div, w = self.guidance.terms(batch["relevance"], self.global_step, out.get("ids_keep"))
            loss = task + g
            self.log("train/guidance_loss", g, batch_size=bs)
            self.log("train/guidance_div", div, batch_size=bs)
            self.log("train/guidance_weight", w, batch_size=bs)
            if self.target.uses_keypoints and self.target.last_fallback is not None:
                self.log("train/no_keypoint_frac", self.target.last_fallback, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if "logits" in out:
            self.log("train/acc", _accuracy(out["logits"], batch["label"]), prog_bar=True, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self.transform.normalize(batch["image"])
        bs = images.shape[0]
        align = batch_idx < self.align_batches
        with self.guidance.capture(force=align):
            out = self.objective(self.net, images, batch)
        if align:
            rel = self.target.sift_relevance(batch["image"], self.patch_size)
            self.log("val/attn_div", self.guidance.divergence_value(rel, out.get("ids_keep")), batch_size=bs)
            self.guidance.clear()
        self.log("val/loss", out["loss"], prog_bar=False, batch_size=bs)
        for k, v in out.get("extra", {}).items():
            self.log(f"val/{k}", v, batch_size=bs)
        if "logits" in out:
            self.log("val/acc", _accuracy(out["logits"], batch["label"]), prog_bar=True, batch_size=bs)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        images = self.transform.normalize(batch["image"])
        out = self.objective(self.net, images, batch)
        if "logits" in out:
            self.log("test/acc", _accuracy(out["logits"], batch["label"]), batch_size=images.shape[0])

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # no weight decay on biases, norms, tokens and position embeddings (timm/solo-learn convention)
            (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token", "dist_token"))
             else decay).append(p)
        opt = self.optimizer_fn([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else \
            int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.warmup_steps, total, self.min_lr_factor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
