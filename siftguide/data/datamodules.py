"""The DataModules: Fashion-MNIST (in memory, a fixed seeded split) and image folders (ImageNet layout, decoded in
loader workers). Both give dict batches ``{"image", "label", "index"}`` of the protocol (:mod:`siftguide.data.protocol`);
the resize to the model's size and the augmentation happen on the device (:class:`~siftguide.data.DeviceTransform`)."""
from __future__ import annotations

import logging
import os

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .datasets import FolderImages, TensorImages, collate_skipping
from .formats import find_fashion_mnist, load_fashion_mnist
from .sampler import train_order

log = logging.getLogger("siftguide.data")

__all__ = ["FashionMNISTDataModule", "ImageFolderDataModule"]


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST (70k 28x28 grey images, 10 classes, MIT licence).

    ``train``/``val`` are a fixed seeded split of the official 60k training images (``val_size`` held out);
    the official 10k test set is kept apart and only used by ``test``. Batches hold uint8 28x28 images; the
    resize to the model's size happens on the device (:class:`DeviceTransform`).
    """

    num_classes = 10
    in_chans = 1

    def __init__(self, root: str | None = None, cache_dir: str = "data", batch_size: int = 128,
                 val_size: int = 5000, train_subset: int | None = None, num_workers: int = 0, split_seed: int = 0,
                 download: bool = True, pin_memory: bool = False, val_subset: int | None = None) -> None:
        super().__init__()
        if val_size <= 0:
            raise ValueError(f"data.val_size must be >= 1, got {val_size}")
        if val_subset is not None and not 0 < val_subset <= val_size:
            raise ValueError(f"data.val_subset={val_subset} must be in [1, data.val_size={val_size}] (or null: "
                             f"validate on the whole validation split)")
        self.root, self.cache_dir, self.download = root, cache_dir, download
        self.batch_size, self.val_size, self.train_subset = batch_size, val_size, train_subset
        self.num_workers, self.split_seed, self.pin_memory = num_workers, split_seed, pin_memory
        self.val_subset = val_subset
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        find_fashion_mnist(self.root, self.cache_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_fashion_mnist(self.root, self.cache_dir, "train", self.download)
        train_idx, val_idx = self.split_indices(len(y))
        self.train_set = TensorImages(x[train_idx], y[train_idx])
        self.val_set = TensorImages(x[val_idx], y[val_idx])
        xt, yt = load_fashion_mnist(self.root, self.cache_dir, "test", self.download)
        self.test_set = TensorImages(xt, yt)
        log.info("Fashion-MNIST: %d train / %d val / %d test images", len(self.train_set), len(self.val_set),
                 len(self.test_set))

    def split_indices(self, n: int) -> tuple[Tensor, Tensor]:
        """``(train_idx, val_idx)`` into the official ``n`` training images: a fixed permutation by
        ``split_seed``, ``val_size`` held out, ``train_subset`` applied (shared by the generated variants)."""
        if self.val_size >= n:
            raise ValueError(f"val_size={self.val_size} leaves no training images out of {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
        if self.train_subset:
            train_idx = train_idx[: self.train_subset]
        return train_idx, val_idx

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        order = train_order(self, ds, self.batch_size) if shuffle else {}  # training: seeded, resumes mid-epoch
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, **order,
                          pin_memory=self.pin_memory, drop_last=shuffle, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        # val_subset: the first N validation images (a fixed subset), for dense validation curves
        ds = self.val_set if self.val_subset is None else Subset(self.val_set, range(self.val_subset))
        return self._loader(ds, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


class ImageFolderDataModule(L.LightningDataModule):
    """Images in ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet layout).

    With ``labels=False`` the training folder may hold unlabelled images in any layout; evaluation then needs a
    labelled ``val`` folder (``val_root``). Workers decode and resize to ``img_size`` deterministically (no random
    crop on the CPU: augmentation is :class:`DeviceTransform`'s); unreadable files are skipped and counted
    (``batch["skipped_files"]``, :func:`collate_skipping`). ``num_workers=None``: ``min(8, CPUs - 1)``;
    ``pin_memory=None``: only when CUDA is available. Empty folders or classes, and train/val class lists that
    differ, are errors at ``setup``. ``max_skip_fraction``: the share of unreadable training samples above which
    the run stops (:class:`~siftguide.callbacks.skips.SkippedFiles`; 1: never).
    """

    def __init__(self, root: str, img_size: int = 224, batch_size: int = 64, num_workers: int | None = None,
                 labels: bool = True, num_classes: int = 1000, in_chans: int = 3, train_dir: str = "train",
                 val_dir: str = "val", val_root: str | None = None, pin_memory: bool | None = None,
                 max_skip_fraction: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction={max_skip_fraction} must be in [0, 1] (the share of unreadable "
                             f"training samples above which the run stops; 1: never)")
        self.max_skip_fraction = float(max_skip_fraction)
        if num_workers is None:  # leave one CPU to the main process; more than 8 rarely helps at these sizes
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            num_workers = max(0, min(8, cpus - 1))
        if pin_memory is None:  # pinned host memory only speeds up copies to a CUDA device
            pin_memory = torch.cuda.is_available()
        self.root, self.img_size, self.batch_size, self.num_workers = root, img_size, batch_size, num_workers
        self.labels, self.num_classes, self.in_chans = labels, num_classes, in_chans
        self.train_dir, self.val_dir, self.val_root, self.pin_memory = train_dir, val_dir, val_root, pin_memory
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_set = FolderImages(os.path.join(self.root, self.train_dir), self.img_size, self.labels, self.in_chans)
        val_root = self.val_root or os.path.join(self.root, self.val_dir)
        val_set = FolderImages(val_root, self.img_size, True, self.in_chans)
        if self.labels and train_set.classes != val_set.classes:  # else the same index means different classes
            only_t, only_v = sorted(set(train_set.classes) - set(val_set.classes)), \
                sorted(set(val_set.classes) - set(train_set.classes))
            raise ValueError(f"the class folders of {os.path.join(self.root, self.train_dir)!r} and "
                             f"{val_root!r} differ (only in train: {only_t[:10]}; only in val: {only_v[:10]}): "
                             f"labels are class indices, so both need the same class subfolders")
        if len(val_set.classes) > self.num_classes:
            raise ValueError(f"{val_root!r} has {len(val_set.classes)} classes but num_classes={self.num_classes}: "
                             f"set num_classes={len(val_set.classes)}")
        self.train_set, self.val_set = train_set, val_set
        log.info("image folders: %d train / %d val images, %d classes, %d workers", len(train_set), len(val_set),
                 len(val_set.classes), self.num_workers)

    def train_dataloader(self) -> DataLoader:
        # seeded order that resumes mid-epoch (siftguide.data.sampler)
        return DataLoader(self.train_set, self.batch_size, **train_order(self, self.train_set, self.batch_size),
                          num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=True, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_skipping)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_skipping)


