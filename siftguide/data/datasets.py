"""The datasets behind the loaders (items ``{"image", "label", "index"}``, :mod:`siftguide.data.protocol`) and the one
place unreadable files are handled.

* :class:`TensorImages`: images held in memory (Fashion-MNIST and its generated variants), sliced directly;
* :class:`FolderImages`: files of an image folder, decoded, converted to 8 bit and resized in the loader workers.
  A file that cannot be decoded gives a zero image flagged ``valid=False`` with its path and the reason;
  :func:`collate_skipping` drops it from the batch and lists it (``batch["skipped_files"]``), and the main process warns
  once per file and run (:func:`warn_unreadable`, called by :class:`~siftguide.callbacks.skips.SkippedFiles`, which
  also keeps the run's count and its ceiling).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from .scanning import scan_images

log = logging.getLogger("siftguide.data")

__all__ = ["TensorImages", "FolderImages", "collate_skipping", "warn_unreadable", "to_8bit", "WARNED"]

class TensorImages(Dataset):
    """Images ``(N, C, h, w)`` and labels ``(N,)`` held in memory; items carry their index."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


WARNED: set[str] = set()  # unreadable files reported in this run (main process; siftguide.callbacks.skips resets it)


def warn_unreadable(path: str, reason: str) -> bool:
    """Warn once per file about an unreadable image (main process: loader workers report their files through the
    batch, :func:`collate_skipping`). Returns whether this call warned."""
    if path in WARNED:
        return False
    WARNED.add(path)
    log.warning("skipping unreadable image %s (%s); skipped samples are counted in data/skipped", path, reason)
    return True


def to_8bit(im, mode: str):
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

    ``batch["skipped_files"]`` lists their ``(path, reason)`` (a host-side list: counting it needs no device sync),
    always present in such batches: the main process counts them and warns once per file and run
    (:class:`~siftguide.callbacks.skips.SkippedFiles`), not each loader worker. A batch may come out smaller than
    ``batch_size``, or empty.
    """
    from torch.utils.data import default_collate

    paths = [s.pop("path", None) for s in samples]
    problems = [s.pop("problem", "") for s in samples]
    batch = default_collate(samples)
    valid = batch.pop("valid")
    n_bad = int((~valid).sum())  # on the CPU, in the loader worker
    if n_bad:
        batch = {k: v[valid] for k, v in batch.items()}
    batch["skipped_files"] = [(p, r) for p, r, ok in zip(paths, problems, valid.tolist()) if not ok and p]
    return batch


class FolderImages(Dataset):
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
            return to_8bit(im, self.mode)

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


