"""The device-side image pipeline: resize to the model's size and kornia augmentation, with the pixel matrix the
augmentation applied (cached keypoints follow it); multi-crop views for self-distillation (DINO, iBOT)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DeviceTransform", "MultiCropTransform", "Views", "centre_boxes", "sample_centres"]


@dataclass
class Views:
    """What the pipeline hands the module for one batch of ``B`` images.

    image: ``(copies * B, C, S, S)`` in [0, 1], view-major (``image[v * B + i]``: view ``v`` of image ``i``), the views
    the relevance stage and the guidance see; matrix: their ``(copies * B, 3, 3)`` pixel transforms (None: no
    augmentation); local: ``(n_local * B, C, s, s)`` normalised small views (multi-crop), or None, with their pixel
    transforms ``local_matrix (n_local * B, 3, 3)`` from the resized image; copies: global views per image."""

    image: Tensor
    matrix: Tensor | None = None
    local: Tensor | None = None
    copies: int = 1
    local_matrix: Tensor | None = None


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

    def needs_relevance(self, stage: str) -> bool:
        """Whether :meth:`views` at ``stage`` reads the images' relevance (guided crops)."""
        return False

    def views(self, images: Tensor, train: bool, relevance: Callable[[Tensor], Tensor] | None = None) -> Views:
        """The batch as :class:`Views`: one augmented view per image (``relevance`` is not read)."""
        x, matrix = self(images, train, return_matrix=True)
        return Views(x, matrix)


def _crops(size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float], hflip: bool):
    augs = [K.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio))]
    if hflip:
        augs.append(K.RandomHorizontalFlip())
    return K.AugmentationSequential(*augs)


def sample_centres(density: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(B, 2)`` points ``(x, y)`` in pixels (pixel centres at integers), one per image, drawn from ``density (B, Gh,
    Gw)`` over the patch grid: a patch with probability proportional to its mass (uniform where a map is empty),
    then a uniform point inside it. Tensor ops only (no host synchronisation)."""
    b, gh, gw = density.shape
    h, w = image_size
    d = density.float().clamp_min(0).flatten(1)
    d = d / d.sum(1, keepdim=True).clamp_min(1e-12) + 1e-6  # an empty map: uniform
    patch = torch.multinomial(d, 1).squeeze(1)
    u = torch.rand(b, 2, device=d.device)
    return torch.stack([((patch % gw) + u[:, 0]) * (w / gw), ((patch // gw) + u[:, 1]) * (h / gh)], 1) - 0.5


def centre_boxes(src: Tensor, centres: Tensor, image_size: tuple[int, int], move: Tensor) -> Tensor:
    """Crop boxes ``src (B, 4, 2)`` (kornia's corners, ``(x, y)``, clockwise from the top left) moved, where ``move
    (B,)`` is True, so that their centre is ``centres (B, 2)`` as nearly as the image allows (sizes unchanged)."""
    h, w = image_size
    top_left, size = src[:, 0], src[:, 2] - src[:, 0]
    limit = torch.tensor([w - 1.0, h - 1.0], device=src.device, dtype=src.dtype) - size
    moved = torch.minimum((centres.to(src.dtype) - size / 2).round().clamp_min(0), limit)
    top_left = torch.where(move[:, None], moved, top_left)
    return src - src[:, :1] + top_left[:, None]


class MultiCropTransform(DeviceTransform):
    """Multi-crop views for self-distillation (DINO, Caron et al. 2021): in training, ``global_crops`` views of each
    image at the model's size (random resized crops of area share ``global_scale``, flipped) and ``local_crops``
    small views at ``local_size`` px (area share ``local_scale``); at evaluation, the resized image alone. Each
    global view keeps its pixel matrix, so cached keypoints follow it into the view.

    Guided crops (``guided_crops = p > 0``): each crop of each image is, with probability ``p``, moved (size and
    aspect kept) so that its centre is a point drawn from the image's relevance map (:func:`sample_centres`: keypoint-
    dense regions for SIFT, another image's for ``relevance.kind=shuffled``); ``p = 0`` (the default) is the uniform
    crops, the control. The pixel matrices follow the moved crops.

    Args (beyond :class:`DeviceTransform`'s): global_crops (>= 1), global_scale, local_crops (>= 0), local_size,
    local_scale, guided_crops (``p`` in [0, 1])."""

    def __init__(self, img_size: int | Sequence[int], mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 hflip: bool = True, crop_ratio: Sequence[float] = (0.75, 1.333), global_crops: int = 2,
                 global_scale: Sequence[float] = (0.4, 1.0), local_crops: int = 4, local_size: int = 32,
                 local_scale: Sequence[float] = (0.05, 0.4), guided_crops: float = 0.0) -> None:
        super().__init__(img_size, mean, std, hflip=hflip, crop_scale=global_scale, crop_ratio=crop_ratio)
        if global_crops < 1 or local_crops < 0:
            raise ValueError(f"transform.global_crops must be >= 1 and transform.local_crops >= 0, got {global_crops} "
                             f"and {local_crops}")
        for key, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"transform.{key}={list((lo, hi))} must be [low, high] with 0 < low <= high <= 1 "
                                 f"(the crop's share of the image area)")
        if local_size < 1:
            raise ValueError(f"transform.local_size must be >= 1 px, got {local_size}")
        if not 0.0 <= guided_crops <= 1.0:
            raise ValueError(f"transform.guided_crops must be a probability in [0, 1] (0: uniform crops), got "
                             f"{guided_crops}")
        self.guided_crops = float(guided_crops)
        self.global_crops, self.local_crops, self.local_size = global_crops, local_crops, int(local_size)
        self.local_augment = _crops((local_size, local_size), local_scale, crop_ratio, hflip) if local_crops else None

    def needs_relevance(self, stage: str) -> bool:
        return stage == "train" and self.guided_crops > 0

    def _crop(self, augment: K.AugmentationSequential, x: Tensor, centres: Tensor | None) -> tuple[Tensor, Tensor]:
        """One crop of every image and its pixel matrix; with ``centres``, moved there with probability ``p``."""
        if centres is None:
            out = augment(x)
        else:
            params = augment.forward_parameters(x.shape)
            if not params[0].name.startswith("RandomResizedCrop"):
                raise TypeError(f"guided crops move a RandomResizedCrop's boxes; this pipeline starts with "
                                f"{params[0].name}")
            crop = params[0].data  # RandomResizedCrop's: src (B, 4, 2) boxes in the input image
            move = torch.rand(x.shape[0], device=x.device) < self.guided_crops
            crop["src"] = centre_boxes(crop["src"], centres, tuple(x.shape[-2:]), move.to(crop["src"].device))
            out = augment(x, params=params)
        return out.clamp_(0.0, 1.0), augment.transform_matrix

    def _crops(self, augment: K.AugmentationSequential, x: Tensor, n: int,
                density: Tensor | None) -> tuple[Tensor, Tensor]:
        """``n`` crops of every image, view-major ``(n * B, ...)``, and their pixel matrices ``(n * B, 3, 3)``."""
        views, matrices = [], []
        for _ in range(n):
            centres = None if density is None else sample_centres(density, tuple(x.shape[-2:]))
            view, matrix = self._crop(augment, x, centres)
            views.append(view)
            matrices.append(matrix)
        return torch.cat(views), torch.cat(matrices)

    def views(self, images: Tensor, train: bool, relevance: Callable[[Tensor], Tensor] | None = None) -> Views:
        """Training views; ``relevance(resized images) -> (B, Gh, Gw)`` maps (read only with guided crops)."""
        if not train:
            return Views(self.resize(images))
        x = self.resize(images)
        density = None
        if self.guided_crops > 0:
            if relevance is None:
                raise ValueError("transform.guided_crops > 0 needs the images' relevance: views(..., relevance=...)")
            density = relevance(x)
        image, matrix = self._crops(self.augment, x, self.global_crops, density)
        local, local_matrix = None, None
        if self.local_crops:
            local, local_matrix = self._crops(self.local_augment, x, self.local_crops, density)
            local = self.normalize(local)
        return Views(image, matrix, local, self.global_crops, local_matrix)
