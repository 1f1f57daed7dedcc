"""``PretrainModule``: one LightningModule that composes the device pipeline, the relevance stage, the objective
and the guidance modes.

Per batch (already on the device):

1. ``on_after_batch_transfer``: :class:`~siftguide.data.DeviceTransform` (resize + kornia augmentation) and, when
   any guidance mode needs it at this stage, ``batch["relevance"]`` from the :class:`~siftguide.relevance.stage.RelevanceStage`
   (SIFT on the device or through the keypoint cache, or a control), once;
2. ``training_step``: token selection (``token_drop``), the objective's forward inside the guidance context
   (attention prior, attention capture), loss = task loss + the loss modes' weighted terms.

Logged: ``train/loss``, ``train/task_loss``, ``train/guidance_loss`` (sum of the loss modes' weighted terms),
``train/guidance/<mode>_{loss,value,weight}``, ``train/guidance_div`` (the ``attention`` mode's divergence),
``train/tokens_kept`` (token dropping), ``train/acc``, ``train/lr``, ``val/loss``, ``val/acc`` and ``val/attn_div``:
KL from SIFT relevance to the last block's class-token attention on a few validation batches, for every run
(baselines too), so alignment compares across runs.
"""
from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn

from .data import DeviceTransform
from .guidance import Guidance, SiftGuidance
from .objectives.base import Objective
from .guidance.schedule import warmup_cosine  # the package's one cosine schedule (kept importable from here)
from .relevance import RelevanceStage

__all__ = ["PretrainModule", "warmup_cosine", "RANK_SEED_STRIDE"]
RANK_SEED_STRIDE = 1_000_003  # seed offset between data-parallel ranks (PretrainModule.decorrelate_ranks)


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float().mean()


class PretrainModule(L.LightningModule):
    """Pre-train a timm ViT with an objective and optional guidance modes.

    Args:
        net: the timm ViT.
        objective: an :class:`~siftguide.objectives.base.Objective`.
        transform: the device-side pipeline.
        relevance: the relevance stage (SIFT or a control, keypoint cache).
        guidance: the composed guidance modes (``Guidance(net, modes={})``: the baseline).
        optimizer: partial ``torch.optim`` constructor taking the parameter groups.
        warmup_steps / min_lr_factor: LR schedule (per optimizer step, over ``trainer.max_steps``).
        align_batches: validation batches on which ``val/attn_div`` is measured (0 disables).
        align_layers: blocks whose class-token attention ``val/attn_div`` measures.
        config: resolved run config, stored in checkpoints.
    """

    def __init__(
        self, net: nn.Module, objective: Objective, transform: DeviceTransform, relevance: RelevanceStage,
        guidance: Guidance, optimizer: Callable[..., torch.optim.Optimizer], warmup_steps: int = 0,
        min_lr_factor: float = 0.0, align_batches: int = 2, align_layers: int | list[int] = -1,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config or {}})
        self.net = net
        self.objective = objective
        objective.setup(net)  # objectives with their own parameters (MAE decoder, probe) build them here
        self.transform = transform
        self.relevance = relevance
        self.guidance = guidance
        guidance.bind(objective)  # objective-side modes (masking, recon_weight); errors for modes it cannot serve
        self.monitor = SiftGuidance(net, layers=align_layers, weight=0.0)  # val/attn_div, never a loss
        self.patch_size = tuple(net.patch_embed.patch_size)
        self.num_patches = int(net.patch_embed.num_patches)
        self.optimizer_fn = optimizer
        self.warmup_steps, self.min_lr_factor = warmup_steps, min_lr_factor
        self.align_batches = align_batches
        self._relevance_ready = False

    # ------------------------------------------------------------------ relevance stage set-up
    def _setup_relevance(self) -> None:
        if self._relevance_ready or self._trainer is None:
            return
        needed = any(self.guidance.needs_relevance(s) for s in ("train", "val", "test"))
        if needed:
            self.relevance.setup(self.trainer.datamodule, self.transform, self.patch_size, self.device)
        self._relevance_ready = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        total = getattr(self, "_skipped_total", None)  # one host sync per checkpoint, not per step
        checkpoint["data_skipped"] = float(total) if total is not None else 0.0

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._skipped_total = float(checkpoint.get("data_skipped", 0.0))  # the next batch's count adds on the device

    def on_fit_start(self) -> None:
        self._setup_relevance()
        if self._trainer is not None and self.guidance.needs_relevance("train") \
                and self.relevance.prefetching(self.device):
            from .relevance.prefetch import DevicePrefetcher, attach

            attach(self.trainer.datamodule, lambda loader: DevicePrefetcher(loader, self._prefetch, self.device))

    @torch.no_grad()
    def _prefetch(self, batch: dict) -> dict:
        """A training batch's work done ahead on a side stream (:mod:`siftguide.relevance.prefetch`): the
        deterministic resize and the keypoints of the un-augmented images (no random draw)."""
        batch = dict(batch)
        if batch["image"].shape[0]:
            batch["image"] = self.transform.resize(batch["image"])
            batch["keypoints"], batch["keypoint_count"] = self.relevance.batch_keypoints(batch["image"])
        return batch

    def on_train_start(self) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            self.decorrelate_ranks()

    def decorrelate_ranks(self) -> None:
        """Data-parallel ranks share the run's seed (same init; one data order split into shards), but their random
        draws (kornia augmentation, MAE masks, random/shuffled relevance, token dropping's random share) must
        differ, or every rank augments its batch position alike: each rank offsets its seeds by
        ``RANK_SEED_STRIDE * rank`` (rank 0 keeps them). Called at train start, after the loaders exist."""
        offset = RANK_SEED_STRIDE * self.global_rank
        if offset == 0:
            return
        torch.manual_seed(torch.initial_seed() + offset)
        for obj in (self.relevance, *self.guidance.modes.values()):
            if hasattr(obj, "reseed"):
                obj.reseed(obj.seed + offset)

    def on_validation_start(self) -> None:
        self._setup_relevance()

    def on_test_start(self) -> None:
        self._setup_relevance()

    # ------------------------------------------------------------------ data on the device
    def _stage(self) -> str:
        if self._trainer is None:
            return "train" if self.training else "val"
        if self.trainer.training:
            return "train"
        return "test" if self.trainer.testing else "val"

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        stage = self._stage()
        batch = dict(batch)
        if batch["image"].shape[0] == 0:  # every file of the batch was unreadable (image folders): nothing to do
            return batch
        batch["image"], matrix = self.transform(batch["image"], train=stage == "train", return_matrix=True)
        if self.guidance.needs_relevance(stage):
            batch["relevance"] = self.relevance(batch["image"], self.patch_size, batch.get("index"), matrix, stage,
                                                self.relevance.keypoints_of(batch))
        return batch

    # ------------------------------------------------------------------ steps
    def _count_skipped(self, batch: dict, stage: str) -> bool:
        """Samples the loader dropped as unreadable (``batch["skipped"]``, image folders): logs ``data/skipped``
        (training samples skipped in the whole run, resumes included: the count travels in the checkpoint; a
        device tensor, no host sync) or ``<stage>/skipped`` (per evaluation pass). True when the batch is empty
        (every file unreadable): the step then has no loss and changes no weight (Lightning still counts it and the
        LR schedule advances), and ``max_empty_batches`` empty training batches in a row stop the run with an
        error, not with an untrained model."""
        n = batch.get("skipped")
        if n is not None and stage == "train":
            total = getattr(self, "_skipped_total", None)
            self._skipped_total = n.float() if total is None else total + n
            self.log("data/skipped", self._skipped_total, batch_size=1)
        elif n is not None:
            self.log(f"{stage}/skipped", n.float(), reduce_fx="sum", batch_size=1, sync_dist=True)  # all ranks
        empty = batch["image"].shape[0] == 0
        if stage == "train":
            self._empty_in_row = getattr(self, "_empty_in_row", 0) + 1 if empty else 0
            if self._empty_in_row >= self.max_empty_batches:
                raise RuntimeError(f"{self._empty_in_row} training batches in a row held no readable image: the data "
                                   f"is mostly unreadable (the warnings above name the files). Fix or remove them")
        return empty

    max_empty_batches = 10  # see _count_skipped

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if self._count_skipped(batch, "train"):
            if self._trainer is None or self.trainer.world_size == 1:
                return None  # Lightning skips backward; no gradient, so no weight changes
            # DDP: every rank must join the gradient all-reduce (None would hang the others); zero gradients
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        images = self.transform.normalize(batch["image"])
        bs = images.shape[0]
        rel = batch.get("relevance")
        self.guidance.set_step(self.global_step)
        keep = self.guidance.select_tokens(rel)
        with self.guidance.forward(rel, "train", keep):
            out = self.objective(self.net, images, batch, "train", keep=keep)
        extra, logs = self.guidance.losses(rel, out.ids_keep)
        # for siftguide.callbacks.balance.GuidanceBalance (a guidance term drowning the task loss), detached
        self.last_terms = (out.loss.detach(),
                           {k: v.detach() for k, v in logs.items() if k.endswith("_loss") and torch.is_tensor(v)})
        self.log("train/task_loss", out.loss, batch_size=bs)
        for k, v in out.metrics.items():
            self.log(f"train/{k}", v, batch_size=bs)
        loss = out.loss
        if extra is not None:
            loss = loss + extra
            self.log("train/guidance_loss", extra, batch_size=bs)
        for k, v in logs.items():
            if v is not None:
                self.log(f"train/guidance/{k}", v, batch_size=bs)
        if logs.get("attention_value") is not None:  # the stable names of the attention mode's terms
            self.log("train/guidance_div", logs["attention_value"], batch_size=bs)
            self.log("train/guidance_weight", logs["attention_weight"], batch_size=bs)
        if keep is not None:
            self.log("train/tokens_kept", keep.shape[1] / self.num_patches, batch_size=bs)
        if rel is not None and self.relevance.uses_keypoints and self.relevance.last_fallback is not None:
            self.log("train/no_keypoint_frac", self.relevance.last_fallback, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if out.logits is not None:
            self.log("train/acc", _accuracy(out.logits, batch["label"]), prog_bar=True, batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.objective.on_train_batch_end(self.net, self.global_step)

    def _eval_step(self, batch: dict, stage: str, align: bool) -> None:
        if self._count_skipped(batch, stage):
            return
        images = self.transform.normalize(batch["image"])
        bs = images.shape[0]
        with self.guidance.forward(batch.get("relevance"), stage), self.monitor.capture(force=align):
            out = self.objective(self.net, images, batch, stage)
        if align:
            rel = self.relevance.sift_relevance(batch["image"], self.patch_size, batch.get("index"), None, stage,
                                                self.relevance.keypoints_of(batch))
            self.log(f"{stage}/attn_div", self.monitor.divergence_value(rel, out.ids_keep), batch_size=bs,
                     sync_dist=True)
            self.monitor.clear()
        # epoch-level means over every rank's share of the set (sums and counts all-reduced once per epoch, not per
        # step); a set whose size is not a multiple of the world size is padded by the DistributedSampler
        self.log(f"{stage}/loss", out.loss, batch_size=bs, sync_dist=True)
        for k, v in out.metrics.items():
            self.log(f"{stage}/{k}", v, batch_size=bs, sync_dist=True)
        if out.logits is not None:
            self.log(f"{stage}/acc", _accuracy(out.logits, batch["label"]), prog_bar=stage == "val", batch_size=bs,
                     sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx < self.align_batches)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", False)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        from timm.optim import param_groups_weight_decay

        # no weight decay on biases, norms (1-D) and what a submodule's no_weight_decay() names (the ViT's
        # pos_embed and cls/reg/dist tokens): timm's split; the optimizer's own weight_decay applies to the rest
        skip = [f"{m}.{n}" if m else n for m, mod in self.named_modules()
                if callable(getattr(mod, "no_weight_decay", None)) for n in mod.no_weight_decay()]
        groups = param_groups_weight_decay(self, weight_decay=1.0, no_weight_decay_list=skip)
        decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
        no_decay = [p for g in groups if not g["weight_decay"] for p in g["params"]]
        # [decay, no decay] in this order: a checkpoint's optimizer state maps onto its groups by position
        opt = self.optimizer_fn([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else \
            int(self.trainer.estimated_stepping_batches)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.warmup_steps, total, self.min_lr_factor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
