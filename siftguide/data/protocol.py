"""What siftguide needs of a DataModule: the protocol, written down in one place, and its one helper.

A DataModule for siftguide is a ``lightning.LightningDataModule`` whose

* ``train_dataloader()`` / ``val_dataloader()`` yield dict batches ``{"image": (B, C, h, w) uint8 or float in
  [0, 1], "label": (B,) long (-1: unlabelled), "index": (B,) long}``: ``index`` is the item's position in its
  dataset (the keypoint caches and the kNN bank are keyed by it); resizing to the model's size and augmentation
  happen on the device (:class:`~siftguide.data.DeviceTransform`), so items may keep any fixed size;
* ``train_set`` / ``val_set`` attributes, set by ``setup()``, are the datasets behind those loaders, items
  ``{"image", "label", "index"}`` (and ``"valid": False`` for a file that could not be read: it is skipped and
  counted, :func:`~siftguide.data.collate_skipping`);
* optional: ``images`` / ``labels`` tensors on a dataset that holds its images in memory (sliced directly, and
  cached by content: :class:`~siftguide.relevance.cache.KeypointCache`); ``samples = [(path, label), ...]`` on a
  dataset of files (the on-disk keypoint cache keyed by file identity:
  :class:`~siftguide.relevance.folder_cache.FolderKeypointCache`); ``labels: bool`` on the DataModule (False:
  unlabelled pre-training); ``batch_size`` and ``num_workers``.

Whatever reads images outside the loaders (the kNN bank, the attention monitor, the analysis tools) goes through
:func:`take`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["take"]


def take(dataset, ids: Sequence[int]) -> tuple[Tensor, Tensor, list[int]]:
    """Items ``ids`` of a protocol dataset: ``images (n, C, h, w)`` (as the loader delivers them), ``labels (n,)``
    long and the ids kept. In-memory datasets are sliced; others are read item by item, unreadable files
    (``valid`` False) left out (so ``n`` may be smaller than ``len(ids)``)."""
    ids = list(ids)
    if getattr(dataset, "images", None) is not None and getattr(dataset, "labels", None) is not None:
        idx = torch.as_tensor(ids, dtype=torch.long)
        return dataset.images[idx], torch.as_tensor(dataset.labels)[idx].long(), ids
    items = [(i, dataset[i]) for i in ids]
    items = [(i, it) for i, it in items if it.get("valid", True)]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long), []
    return (torch.stack([it["image"] for _, it in items]),
            torch.stack([torch.as_tensor(it["label"]) for _, it in items]).long(), [i for i, _ in items])
