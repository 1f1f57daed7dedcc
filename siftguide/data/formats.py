"""Fashion-MNIST's files: the gzipped IDX format, where the files are found (the Debian package, a folder, torchvision's
cache or download) and the official splits as tensors."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("siftguide.data")

__all__ = ["DEBIAN_FASHION_MNIST", "FASHION_MNIST_CLASSES", "read_idx", "find_fashion_mnist", "load_fashion_mnist"]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def read_idx(path: Path, magic: int) -> np.ndarray:
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
    x = torch.from_numpy(read_idx(d / img_file, 2051).copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(d / lbl_file, 2049).copy())
    if len(x) != len(y):
        raise RuntimeError(f"{d}: {len(x)} images but {len(y)} labels in the {split} split")
    return x, y


