"""``val/attn_div``: how far the model's attention is from its images' SIFT relevance, logged for every run.

On the first ``batches`` validation batches of each validation, the chosen blocks' attention of the module's own
evaluation forward (of the network the objective evaluates: the run's net, a self-distillation teacher) is captured (those blocks run timm's explicit attention path for these batches) and compared
with the SIFT relevance of the (un-augmented) validation images, computed with the run's relevance settings whatever
its map kind: ``KL(r || a)`` with ``a`` the class token's attention over the patches (the mean attention received
without a class token), averaged over the blocks, as the ``attention`` mode measures it
(:meth:`~siftguide.guidance.AttentionAlignment.divergence_value`); for a masked objective the relevance is restricted
to the patches its encoder saw. Baselines log it too, so alignment compares across runs.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import lightning as L

from ..guidance import AttentionAlignment

__all__ = ["AttentionDivergence"]


class AttentionDivergence(L.Callback):
    """Args: batches (validation batches measured per validation; 0: off); layers (blocks, negative from the end)."""

    def __init__(self, batches: int = 2, layers: int | Sequence[int] = -1) -> None:
        if batches < 0:
            raise ValueError(f"callbacks.attention_divergence.batches must be >= 0, got {batches}")
        self.batches, self.layers = int(batches), layers
        self._meter: AttentionAlignment | None = None
        self._capture: contextlib.ExitStack | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.batches and self._meter is None:  # blocks out of range: an error before any step
            self._meter = AttentionAlignment(pl_module.objective.evaluated(pl_module.net), layers=self.layers,
                                             weight=0.0)

    def _measured(self, trainer, batch_idx: int) -> bool:
        return batch_idx < self.batches and not trainer.sanity_checking

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._measured(trainer, batch_idx) or batch["image"].shape[0] == 0:
            return
        if self._meter is None:
            self._meter = AttentionAlignment(pl_module.objective.evaluated(pl_module.net), layers=self.layers,
                                             weight=0.0)
        self._capture = contextlib.ExitStack()
        self._capture.enter_context(self._meter.capture(force=True))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._capture is None:
            return
        try:
            self._capture.close()
            stage = pl_module.relevance
            rel, _ = stage.sift_relevance(batch["image"], pl_module.patch_size, batch.get("index"), None, "val",
                                          stage.keypoints_of(batch))
            ids = outputs.get("ids_keep") if isinstance(outputs, dict) else None
            pl_module.log("val/attn_div", self._meter.divergence_value(rel, ids), batch_size=batch["image"].shape[0],
                          sync_dist=True)
        finally:
            self._meter.clear()
            self._capture = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None
