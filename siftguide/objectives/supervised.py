"""Supervised classification with a timm ViT's own head."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SupervisedObjective(nn.Module):
    """Cross-entropy on the model's logits; ``features`` are the pooled pre-logits (for kNN evaluation)."""

    needs_labels = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def setup(self, net: nn.Module) -> None:
        self.num_prefix = int(getattr(net, "num_prefix_tokens", 1))

    def tokens(self, net: nn.Module, images: Tensor) -> Tensor:
        """Final tokens ``(B, N, D)`` of full images (for kNN evaluation)."""
        return net.forward_features(images)

    def forward(self, net: nn.Module, images: Tensor, batch: dict) -> dict[str, Tensor]:
        tokens = net.forward_features(images)
        features = net.forward_head(tokens, pre_logits=True)
        logits = net.forward_head(tokens)  # pooling is cheap; the head may be a tuple (DeiT distilled)
        labels = batch["label"]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits, "features": features}
