"""``PretrainModule``: the one LightningModule; it composes the device pipeline, the relevance stage, the objective
and the guidance modes, and owns the optimizer.

Per batch (already on the device; docs/architecture.md draws it file by file):

1. ``on_after_batch_transfer``: the views of :class:`~siftguide.data.DeviceTransform` (resize, kornia augmentation,
   pixel matrices; multi-crop, guided crops) and, when an active mode reads it at this stage, ``batch["relevance"]``
   and ``batch["relevance_stats"]`` from the :class:`~siftguide.relevance.RelevanceStage`, once;
2. ``training_step`` (optimizer step ``step`` passed to every guidance hook and the objective): what the modes hand
   the objective (tokens, patch weights and masks), its forward in the guidance context, loss = task loss + the
   loss modes' weighted terms; it returns ``{"loss", "task_loss", "guidance_terms"}``.

Logged: ``train/loss``, ``train/task_loss``, ``train/guidance_loss`` (the loss modes' weighted terms), each mode's
``train/guidance/<mode>_<key>``, ``train/tokens_kept`` (share of patch tokens the encoder ran), the relevance stage's
``train/<stat>`` (``no_keypoint_frac``), ``train/acc``, ``<stage>/loss``, ``<stage>/acc`` and the objective's metrics.
Callbacks log the rest (learning rate, timers and cost, ``val/attn_div``, kNN, skipped files).
"""
from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from .data import DeviceTransform
from .guidance import Guidance
from .objectives.base import Objective
from .relevance import RelevanceStage
from .rng import RandomStream

__all__ = ["PretrainModule", "RANK_SEED_STRIDE"]
RANK_SEED_STRIDE = 1_000_003  # seed offset between data-parallel ranks (PretrainModule.decorrelate_ranks)


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Top-1 accuracy of ``(B, C)`` logits against ``(B,)`` labels (torchmetrics' micro average)."""
    return multiclass_accuracy(logits, labels, num_classes=logits.shape[-1], average="micro", validate_args=False)


class PretrainModule(L.LightningModule):
    """Pre-train a timm ViT with an objective and optional guidance modes.

    Args:
        net: the timm ViT. objective: an :class:`~siftguide.objectives.base.Objective`. transform: the device-side
        pipeline. relevance: the relevance stage (SIFT or a control; its caches are set up by the
        :class:`~siftguide.callbacks.RelevanceSetup` callback). guidance: the composed guidance modes
        (``Guidance(net, modes={})``: the baseline). optimizer: partial ``torch.optim`` constructor taking the
        parameter groups. warmup_steps / min_lr_factor: LR schedule (per optimizer step, over ``trainer.max_steps``).
        config: resolved run config, stored in checkpoints.
    """

    def __init__(self, net: nn.Module, objective: Objective, transform: DeviceTransform, relevance: RelevanceStage,
                 guidance: Guidance, optimizer: Callable[..., torch.optim.Optimizer], warmup_steps: int = 0,
                 min_lr_factor: float = 0.0, config: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config or {}})
        self.net, self.objective, self.transform = net, objective, transform
        self.relevance, self.guidance = relevance, guidance
        objective.setup(net)  # objectives with their own parameters (MAE decoder, probe) build them here
        guidance.check(objective)  # a mode the objective cannot serve: an error before training
        self.patch_size, self.num_patches = tuple(net.patch_embed.patch_size), int(net.patch_embed.num_patches)
        self.optimizer_fn, self.warmup_steps, self.min_lr_factor = optimizer, warmup_steps, min_lr_factor

    # ------------------------------------------------------------------ ranks
    def on_train_start(self) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            self.decorrelate_ranks()

    def decorrelate_ranks(self) -> None:
        """Data-parallel ranks share the run's seed (same init; one data order split into shards), but their random
        draws (augmentation, masks, the controls' and token dropping's streams) must differ: each rank offsets its
        seeds by ``RANK_SEED_STRIDE * rank`` (rank 0 keeps them). Called at train start, after the loaders exist."""
        offset = RANK_SEED_STRIDE * self.global_rank
        if offset == 0:
            return
        torch.manual_seed(torch.initial_seed() + offset)
        for part in (self.relevance, self.objective, *self.guidance.modes.values()):
            rng = getattr(part, "rng", None)
            if isinstance(rng, RandomStream):
                rng.reseed(rng.seed + offset)

    # ------------------------------------------------------------------ data on the device
    def _stage(self) -> str:
        if self._trainer is None:
            return "train" if self.training else "val"
        if self.trainer.training:
            return "train"
        return "test" if self.trainer.testing else "val"

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        stage, batch = self._stage(), dict(batch)
        if batch["image"].shape[0] == 0:  # every file of the batch was unreadable (image folders): nothing to do
            return batch
        kp, idx, rel = self.relevance.keypoints_of(batch), batch.get("index"), self.relevance  # guided crops: maps of
        v = self.transform.views(batch["image"], stage == "train",  # the resized images (multi-crop: views view-major)
                                 lambda x: rel(x, self.patch_size, idx, None, stage, kp)[0])
        batch["image"], batch["local_views"] = v.image, v.local
        if self.guidance.needs_relevance(stage):
            batch["relevance"], batch["relevance_stats"] = self.relevance(
                v.image, self.patch_size, idx, v.matrix, stage, kp)
        return batch

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> dict | Tensor | None:
        if batch["image"].shape[0] == 0:  # every file unreadable (SkippedFiles counts it): no weight changes
            if self._trainer is None or self.trainer.world_size == 1:
                return None  # Lightning skips backward
            # DDP: every rank must join the gradient all-reduce (None would hang the others); zero gradients
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        step, images, rel = self.global_step, self.transform.normalize(batch["image"]), batch.get("relevance")
        bs = images.shape[0]
        guided = self.guidance.guided(rel, step, self.objective)  # tokens, patch weights, patch masks
        with self.guidance.forward(rel, "train", step, guided.ids_keep):
            out = self.objective(self.net, images, batch, "train", guided, step)
        extra, logs = self.guidance.losses(rel, step, out.ids_keep)
        loss = out.loss if extra is None else out.loss + extra
        values = {"task_loss": out.loss, **({} if extra is None else {"guidance_loss": extra}), **out.metrics,
                  **batch.get("relevance_stats", {}), **{f"guidance/{k}": v for k, v in logs.items() if v is not None}}
        values.update(guided.token_shares(self.num_patches))
        for k, v in values.items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if out.logits is not None:
            self.log("train/acc", accuracy(out.logits, batch["label"]), prog_bar=True, batch_size=bs)
        return {"loss": loss, "task_loss": out.loss.detach(),  # what the callbacks read (the guidance balance)
                "guidance_terms": {k: v.detach() for k, v in logs.items() if k.endswith("_loss")}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.objective.on_train_batch_end(self.net, self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:  # e.g. DINO's frozen last layer
        self.objective.before_optimizer_step(self.global_step)

    def _eval_step(self, batch: dict, stage: str) -> dict | None:
        if batch["image"].shape[0] == 0:
            return None
        images = self.transform.normalize(batch["image"])
        bs = images.shape[0]
        # the schedules of the last training step (a validation after step k evaluates the model of step k)
        with self.guidance.forward(batch.get("relevance"), stage, max(self.global_step - 1, 0)):
            out = self.objective(self.net, images, batch, stage, step=self.global_step)
        # epoch-level means over every rank's share of the set (sums and counts all-reduced once per epoch, not per
        # step); a set whose size is not a multiple of the world size is padded by the DistributedSampler
        self.log(f"{stage}/loss", out.loss, batch_size=bs, sync_dist=True)
        for k, v in out.metrics.items():
            self.log(f"{stage}/{k}", v, batch_size=bs, sync_dist=True)
        if out.logits is not None:
            self.log(f"{stage}/acc", accuracy(out.logits, batch["label"]), prog_bar=stage == "val", batch_size=bs,
                     sync_dist=True)
        return {"ids_keep": out.ids_keep}  # the attention divergence callback restricts relevance to these

    def validation_step(self, batch: dict, batch_idx: int) -> dict | None:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict | None:
        return self._eval_step(batch, "test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        from timm.optim import param_groups_weight_decay

        from .guidance.schedule import warmup_cosine

        # no weight decay on biases, norms (1-D) and what a submodule's no_weight_decay() names (the ViT's
        # pos_embed and cls/reg/dist tokens): timm's split; the optimizer's own weight_decay applies to the rest
        skip = [f"{m}.{n}" if m else n for m, mod in self.named_modules()
                if callable(getattr(mod, "no_weight_decay", None)) for n in mod.no_weight_decay()]
        groups = param_groups_weight_decay(self, weight_decay=1.0, no_weight_decay_list=skip)
        decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
        no_decay = [p for g in groups if not g["weight_decay"] for p in g["params"]]
        # [decay, no decay] in this order: a checkpoint's optimizer state maps onto its groups by position
        opt = self.optimizer_fn([{"params": decay, "name": "decay"},
                                 {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}])
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else \
            int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.warmup_steps, total, self.min_lr_factor))
        # "name": the learning rate is logged as train/lr/<group> (LearningRateMonitor, configs/callbacks)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}
