"""The device-side image pipeline: resize to the model's size and kornia augmentation, with the pixel matrix the
augmentation applied (cached keypoints follow it)."""
from __future__ import annotations

from typing import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DeviceTransform"]


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
