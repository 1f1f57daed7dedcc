"""DataModules and the device-side image pipeline.

CPU side does only decoding and cheap work; everything per-pixel happens on the training device in
:class:`DeviceTransform` (called from ``PretrainModule.on_after_batch_transfer``): uint8 -> float in [0, 1],
resize to the model's size, kornia augmentation. Batches are ``{"image": (B, C, H, W), "label": (B,)}``.
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Sequence

import kornia.augmentation as K
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from ..sampler import train_order

log = logging.getLogger(__name__)

__all__ = ["FashionMNISTDataModule", "ImageFolderDataModule", "DeviceTransform", "load_fashion_mnist",
           "DEBIAN_FASHION_MNIST", "collate_skipping", "warn_unreadable", "scan_images"]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file (2051: uint8 images (N, 28, 28); 2049: labels (N,)), checking its header."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    got_magic, n = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
    header = 16 if magic == 2051 else 8
    item = 28 * 28 if magic == 2051 else 1
    if got_magic != magic or len(data) != header + n * item:
        raise RuntimeError(f"{path} is not a valid Fashion-MNIST IDX file (magic {got_magic}, expected {magic}; "
                           f"{len(data)} bytes for {n} items). Delete it and let siftguide fetch the data again.")
    if magic == 2051:
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, 28, 28)
    return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)


def _has_files(d: Path) -> bool:
    return all((d / f).is_file() for pair in _FILES.values() for f in pair)


def find_fashion_mnist(root: str | None, cache_dir: str, download: bool = True) -> Path:
    """Directory holding the four official Fashion-MNIST ``*.gz`` files.

    Looks in ``root`` (if given), the Debian package's ``/usr/share/datasets/fashion-mnist``, and torchvision's
    cache ``cache_dir/FashionMNIST/raw``; otherwise downloads with torchvision (needs internet).
    """
    candidates = ([Path(root)] if root else []) + [Path(DEBIAN_FASHION_MNIST), Path(cache_dir) / "FashionMNIST" / "raw"]
    for d in candidates:
        if _has_files(d):
            return d
    if root and not _has_files(Path(root)):
        log.warning("data.root=%s does not hold the Fashion-MNIST *.gz files; trying other sources", root)
    err = None
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(cache_dir, train=train, download=True)
            if _has_files(candidates[-1]):
                return candidates[-1]
        except Exception as e:  # noqa: BLE001 - network errors come in many types; reported below
            err = e
    raise RuntimeError(
        "Fashion-MNIST not found. Looked in: " + ", ".join(str(c) for c in candidates)
        + (f"; torchvision download failed ({type(err).__name__}: {err})" if err else "; download disabled")
        + ". Fix: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or run once with internet access, or "
        "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz in a folder and pass data.root=/that/folder."
    )


def load_fashion_mnist(root: str | None = None, cache_dir: str = "data", split: str = "train",
                       download: bool = True) -> tuple[Tensor, Tensor]:
    """``(N, 1, 28, 28)`` uint8 images and ``(N,)`` int64 labels of the official ``train`` or ``test`` split."""
    d = find_fashion_mnist(root, cache_dir, download)
    img_file, lbl_file = _FILES[split]
    x = torch.from_numpy(_read_idx(d / img_file, 2051).copy()).unsqueeze(1)
    y = torch.from_numpy(_read_idx(d / lbl_file, 2049).copy())
    if len(x) != len(y):
        raise RuntimeError(f"{d}: {len(x)} images but {len(y)} labels in the {split} split")
    return x, y


class _TensorImages(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


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
        self.train_set = _TensorImages(x[train_idx], y[train_idx])
        self.val_set = _TensorImages(x[val_idx], y[val_idx])
        xt, yt = load_fashion_mnist(self.root, self.cache_dir, "test", self.download)
        self.test_set = _TensorImages(xt, yt)
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


_WARNED: set[str] = set()  # unreadable files reported in this run (main process; siftguide.callbacks.skips resets it)


def warn_unreadable(path: str, reason: str) -> bool:
    """Warn once per file about an unreadable image (main process: loader workers report their files through the
    batch, :func:`collate_skipping`). Returns whether this call warned."""
    if path in _WARNED:
        return False
    _WARNED.add(path)
    log.warning("skipping unreadable image %s (%s); skipped samples are counted in data/skipped", path, reason)
    return True


def scan_images(top: str, keep) -> list[str]:
    """Files below ``top`` for which ``keep(name)`` holds, in torchvision's ``make_dataset`` order (``os.walk``
    following directory symlinks, folders sorted by path, files by name), without following a symlink into a loop:
    a directory whose real path is the folder itself or one of its ancestors (``train/a/loop -> .``, ``up -> ../..``)
    is skipped with a warning naming it. (torchvision follows such links until the path is too long: a class of 8
    images became 328.) Links to folders elsewhere are followed."""
    def chain_of(path: str) -> tuple[str, ...]:
        real = os.path.realpath(path)
        out = [real]
        while os.path.dirname(out[-1]) != out[-1]:
            out.append(os.path.dirname(out[-1]))
        return tuple(out)

    chains = {top: chain_of(top)}
    found = []
    for root, dirs, files in os.walk(top, followlinks=True):
        chain = chains.pop(root, None) or chain_of(root)
        kept = []
        for d in sorted(dirs):
            path = os.path.join(root, d)
            real = os.path.realpath(path)
            if real in chain:
                log.warning("not following %s: a symlink to %s, which holds it (a loop); its images are read once",
                            path, real)
                continue
            chains[path] = (real, *chain)
            kept.append(d)
        dirs[:] = kept
        found.append((root, sorted(f for f in files if keep(f))))
    return [os.path.join(root, f) for root, names in sorted(found) for f in names]


def _to_8bit(im, mode: str):
    """A PIL image in any mode -> 8-bit ``mode`` (``"L"`` or ``"RGB"``).

    16-bit grey (``I;16*``, and ``I`` as 16-bit PNGs load) is scaled by 255 / 65535 (PIL's ``convert`` would clip
    it at 255: near-white); images with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) are
    composited over black (fully transparent pixels become black, as most files store them); ``CMYK``, palette,
    1-bit and ``YCbCr`` go through PIL's ``convert``; RGB -> L is PIL's luma (ITU-R 601-2), grey -> RGB repeats
    the channel.
    """
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float32).clip(0, 65535)
        im = Image.fromarray((a * (255.0 / 65535.0) + 0.5).astype(np.uint8), "L")
    elif im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return im if im.mode == mode else im.convert(mode)


def collate_skipping(samples: list[dict]) -> dict[str, Tensor]:
    """``default_collate`` that drops the samples flagged ``valid=False`` (files that could not be decoded).

    ``batch["skipped"]`` is their number, a 0-d int64 tensor: it travels to the device with the batch, so the
    module counts skips without a host sync. ``batch["skipped_files"]`` lists their ``(path, reason)``: the main
    process warns once per file and run (:class:`~siftguide.callbacks.skips.SkippedFiles`), not each loader worker. A batch
    may come out smaller than ``batch_size``, or empty.
    """
    from torch.utils.data import default_collate

    paths = [s.pop("path", None) for s in samples]
    problems = [s.pop("problem", "") for s in samples]
    batch = default_collate(samples)
    valid = batch.pop("valid")
    n_bad = int((~valid).sum())  # on the CPU, in the loader worker
    if n_bad:
        batch = {k: v[valid] for k, v in batch.items()}
    batch["skipped"] = torch.tensor(n_bad)
    batch["skipped_files"] = [(p, r) for p, r, ok in zip(paths, problems, valid.tolist()) if not ok and p]
    return batch


class _FolderImages(Dataset):
    """ImageFolder-style dataset returning uint8 ``(C, S, S)`` tensors: decode, convert to 8-bit ``L``/``RGB``
    (:func:`_to_8bit`), then a deterministic resize of the shorter side to ``S`` and a centre crop.

    Deterministic on purpose: the random crop happens once, on the device (:class:`DeviceTransform`), and the
    same index always gives the same tensor (the kNN bank is the same at every validation). A file that cannot
    be decoded (empty, truncated, not an image) gives a zero image flagged ``valid=False`` with its path and the
    reason; :func:`collate_skipping` drops it, counts it and passes the path on (the main process warns once per
    file: :func:`warn_unreadable`). Folders are scanned by :func:`scan_images` (directory symlinks followed, loops
    not).
    """

    def __init__(self, root: str, size: int, labels: bool, channels: int = 3) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        if channels not in (1, 3):
            raise ValueError(f"image folders give 1 (grey) or 3 (RGB) channels; got in_chans={channels}")
        self.size, self.channels, self.mode = size, channels, ("RGB" if channels == 3 else "L")
        exts = " ".join(IMG_EXTENSIONS)
        if not Path(root).is_dir():
            raise FileNotFoundError(f"image folder {root!r} does not exist: check data.root (and data.train_dir, "
                                    f"data.val_dir, data.val_root); the layout is <root>/train/<class>/<image>")
        if labels:
            if not any(e.is_dir() for e in os.scandir(root)):
                raise FileNotFoundError(
                    f"image folder {root!r} has no class subfolders: labelled images are read from "
                    f"{root}/<class>/<image>. Put each class in its own subfolder, or pre-train on unlabelled images "
                    f"with data.labels=false objective=mae")
            classes = sorted(e.name for e in os.scandir(root) if e.is_dir())  # as torchvision's ImageFolder
            samples = [(p, i) for i, c in enumerate(classes)
                       for p in scan_images(os.path.join(root, c), lambda f: f.lower().endswith(IMG_EXTENSIONS))]
            counts = np.bincount(np.asarray([t for _, t in samples], dtype=np.int64), minlength=len(classes))
            empty = [c for c, n in zip(classes, counts) if n == 0]
            if empty:
                raise FileNotFoundError(
                    f"image folder {root!r}: class folder(s) {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}"
                    f" ({len(empty)} of {len(classes)}) hold no images ({exts}). Every subfolder is a class: add "
                    f"images to them or remove them")
            self.classes, self.samples = classes, samples
        else:  # every image file below root, label -1
            files = sorted(Path(p) for p in scan_images(root, lambda f: Path(f).suffix.lower() in IMG_EXTENSIONS))
            if not files:
                raise FileNotFoundError(f"no images ({exts}) found under {root!r}")
            self.classes, self.samples = [], [(str(p), -1) for p in files]

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, path: str):
        from PIL import Image

        with Image.open(path) as im:
            im.draft(None, (self.size, self.size))  # JPEG: decode at a reduced scale still >= size (faster)
            im.load()  # truncated files fail here, not later
            return _to_8bit(im, self.mode)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        from PIL import Image, ImageOps

        path, label = self.samples[i]
        try:
            im = self._decode(path)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            reason = f"{type(e).__name__}: {e}"
            if get_worker_info() is None:  # in the main process (workers report through the batch)
                warn_unreadable(path, reason)
            x = torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8)
            return {"image": x, "label": torch.tensor(label), "index": i, "valid": False, "path": path,
                    "problem": reason}
        im = ImageOps.fit(im, (self.size, self.size), Image.Resampling.BILINEAR)  # shorter side -> S, centre crop
        x = torch.from_numpy(np.array(im, dtype=np.uint8))
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()  # (S, S, 3) -> (3, S, S)
        return {"image": x, "label": torch.tensor(label), "index": i, "valid": True, "path": path, "problem": ""}


class ImageFolderDataModule(L.LightningDataModule):
    """Images in ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet layout).

    With ``labels=False`` the training folder may hold unlabelled images in any layout; evaluation then needs a
    labelled ``val`` folder (``val_root``). Workers decode and resize to ``img_size`` deterministically (no random
    crop on the CPU: augmentation is :class:`DeviceTransform`'s); unreadable files are skipped and counted
    (``batch["skipped"]``, :func:`collate_skipping`). ``num_workers=None``: ``min(8, CPUs - 1)``;
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
        train_set = _FolderImages(os.path.join(self.root, self.train_dir), self.img_size, self.labels, self.in_chans)
        val_root = self.val_root or os.path.join(self.root, self.val_dir)
        val_set = _FolderImages(val_root, self.img_size, True, self.in_chans)
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
        # seeded order that resumes mid-epoch (siftguide.sampler)
        return DataLoader(self.train_set, self.batch_size, **train_order(self, self.train_set, self.batch_size),
                          num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=True, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_skipping)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_skipping)


class DeviceTransform(nn.Module):
    """Device-side pipeline: uint8/float ``(B, C, h, w)`` -> float ``(B, C, S, S)`` in [0, 1].

    Resizes (bilinear, antialiased when shrinking) to ``img_size`` and, in training, applies kornia
    augmentation (random resized crop, horizontal flip). The model's input normalisation is separate
    (``normalize``) because SIFT needs the [0, 1] image.
    """

    def __init__(self, img_size: int | Sequence[int], mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 hflip: bool = True, crop_scale: Sequence[float] | None = (0.8, 1.0),
                 crop_ratio: Sequence[float] = (0.9, 1.1)) -> None:
        super().__init__()
        self.size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        augs = []
        if crop_scale is not None:
            augs.append(K.RandomResizedCrop(self.size, scale=tuple(crop_scale), ratio=tuple(crop_ratio)))
        if hflip:
            augs.append(K.RandomHorizontalFlip())
        self.augment = K.AugmentationSequential(*augs) if augs else None
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def resize(self, images: Tensor) -> Tensor:
        """The deterministic part: uint8/float -> float [0, 1] at ``img_size``."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size[-1])
        return x.clamp_(0.0, 1.0)

    def forward(self, images: Tensor, train: bool, return_matrix: bool = False):
        """Returns the images, and with ``return_matrix`` also the ``(B, 3, 3)`` pixel transform the augmentation
        applied (``None`` when none was), so that cached keypoints can follow it."""
        x = self.resize(images)
        matrix = None
        if train and self.augment is not None:
            x = self.augment(x).clamp_(0.0, 1.0)
            matrix = self.augment.transform_matrix
        return (x, matrix) if return_matrix else x

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
