"""Images for the analysis tools: a folder of image files or a siftguide dataset split, loaded at a model's input
size and channels (:func:`prepare_images`) and batched (:func:`image_batches`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..relevance import rgb_to_gray
from .loading import AnalyzeError, LoadedModel
from .metrics import check_shape

__all__ = ["IMAGE_EXTENSIONS", "prepare_images", "normalise", "FolderImages", "DatasetImages", "dataset_source",
           "image_batches"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def prepare_images(images: Tensor, in_chans: int, size: tuple[int, int]) -> Tensor:
    """uint8 or float ``(B, 1|3, h, w)`` -> float ``(B, in_chans, H, W)`` in [0, 1]: grey <-> RGB conversion
    (OpenCV's grey weights; grey is repeated to every channel) and a bilinear resize (antialiased when shrinking)."""
    check_shape(images, 4, "(B, C, H, W)", "images")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] != in_chans:
        if x.shape[1] == 3 and in_chans == 1:
            x = rgb_to_gray(x)
        elif x.shape[1] == 1:
            x = x.expand(-1, in_chans, -1, -1)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel images to the model's {in_chans} channels")
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size[-1] or x.shape[-2] > size[-2])
    return x.clamp(0.0, 1.0).contiguous()


def normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (images - mean) / std


class FolderImages:
    """Every image file below a folder (sorted), unlabelled."""

    def __init__(self, root: str) -> None:
        p = Path(root)
        if not p.is_dir():
            raise AnalyzeError(f"--images {root!r} is not a folder")
        self.files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise AnalyzeError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
        self.class_names: list[str] | None = None
        self.has_labels = False

    def __len__(self) -> int:
        return len(self.files)

    def load(self, ids: Sequence[int], in_chans: int, size: tuple[int, int]) -> tuple[Tensor, Tensor, list]:
        import numpy as np
        from PIL import Image

        out = []
        for i in ids:
            with Image.open(self.files[i]) as im:
                arr = np.asarray(im.convert("L" if in_chans == 1 else "RGB"))
            x = torch.from_numpy(arr.copy())
            x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
            out.append(prepare_images(x, in_chans, size))
        return torch.cat(out), torch.full((len(ids),), -1), [self.files[i] for i in ids]


class DatasetImages:
    """A siftguide dataset split (Fashion-MNIST, image folder) of ``{"image": uint8, "label"}`` items."""

    def __init__(self, dataset: Any, class_names: Sequence[str] | None, has_labels: bool = True) -> None:
        self.ds, self.class_names, self.has_labels = dataset, list(class_names) if class_names else None, has_labels

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, ids: Sequence[int], in_chans: int, size: tuple[int, int]) -> tuple[Tensor, Tensor, list]:
        from ..data.protocol import take

        x, y, kept = take(self.ds, ids)  # unreadable files left out
        return prepare_images(x, in_chans, size), y, kept


def dataset_source(model: LoadedModel, overrides: Sequence[str], split: str) -> DatasetImages:
    """The validation (or test) split of the checkpoint's data config, or Fashion-MNIST, with ``data.KEY=VALUE``
    overrides."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = (model.config or {}).get("data") or {"_target_": "siftguide.data.FashionMNISTDataModule"}
    cfg = OmegaConf.create(dict(node))
    dotlist = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or not key.startswith("data."):
            raise AnalyzeError(f"unrecognised argument {o!r}: data overrides look like data.KEY=VALUE "
                               "(e.g. data.val_size=1000)")
        dotlist.append(o[len("data."):])
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    try:
        dm = instantiate(cfg)
        dm.setup("fit")
    except Exception as e:  # noqa: BLE001 - missing data, bad root: tell the user which config failed
        raise AnalyzeError(f"could not load the images of data config {OmegaConf.to_container(cfg)}: "
                           f"{type(e).__name__}: {e}") from e
    ds = getattr(dm, f"{split}_set", None)
    if ds is None:
        raise AnalyzeError(f"the data module {type(dm).__name__} has no {split} split")
    names = None
    from ..data import FASHION_MNIST_CLASSES, FashionMNISTDataModule

    if isinstance(dm, FashionMNISTDataModule):  # and its generated variants (translated, tint, decoy, ...)
        names = FASHION_MNIST_CLASSES
    elif hasattr(ds, "ds") and hasattr(ds.ds, "classes"):
        names = ds.ds.classes
    return DatasetImages(ds, names, has_labels=bool(getattr(dm, "labels", True)) or split != "train")


def image_batches(source: Any, ids: Sequence[int], batch_size: int, in_chans: int,
                  size: tuple[int, int]) -> Iterator[dict]:
    """``{"image": (B, C, H, W) in [0, 1], "label": (B,) or None (unlabelled), "index": list}`` batches of the
    images ``ids`` of ``source`` at ``in_chans`` channels and ``size``."""
    for s in range(0, len(ids), batch_size):
        x, y, index = source.load(ids[s: s + batch_size], in_chans, size)
        yield {"image": x, "label": y if bool((y >= 0).any()) else None, "index": index}
