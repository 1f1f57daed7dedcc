"""Supervised classification with a timm ViT's own head."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Guided, Objective, ObjectiveOutput, encode, pool_kept


class SupervisedObjective(Objective):
    """Cross-entropy on the model's logits; ``features`` are the pooled pre-logits (for kNN evaluation).

    With ``guided.ids_keep`` (token dropping) the blocks see only those patch tokens; timm's pooling (class token or
    mean of the patch tokens) works on the shortened sequence. With ``guided.keep_counts`` (a per-image budget) the
    padding of each row is masked out of attention and of the mean pooling (:func:`~.base.pool_kept`).
    """

    needs_labels = True
    offers = frozenset({"token_subset"})

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, net: nn.Module, images: Tensor, batch: dict, stage: str = "train", guided: Guided | None = None,
                step: int = 0) -> ObjectiveOutput:
        self.check_stage(stage)
        keep = guided.ids_keep if guided is not None else None
        counts = guided.keep_counts if keep is not None else None
        num_prefix = getattr(self, "num_prefix", int(getattr(net, "num_prefix_tokens", 1)))
        tokens = net.forward_features(images) if keep is None else encode(net, images, keep, num_prefix, counts)
        if counts is not None:
            tokens = pool_kept(net, tokens, counts, num_prefix)
        features = net.forward_head(tokens, pre_logits=True)
        logits = net.forward_head(tokens)  # pooling is cheap; the head may be a tuple (DeiT distilled)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        return ObjectiveOutput(loss=loss, logits=logits, features=features, ids_keep=keep)
