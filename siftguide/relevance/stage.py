"""The relevance stage: one object produces ``batch["relevance"]`` for every guidance mode that consumes it.

``RelevanceSource`` owns the target kind (SIFT or a control), the relevance settings, the keypoint cache and
their set-up from the datamodule. Kinds (each map ``(B, Gh, Gw)``, >= 0, summing to 1 per image):

| kind | map | what it controls for |
|---|---|---|
| ``sift`` | SIFT keypoints of the (augmented) image -> relevance | — |
| ``shuffled`` | SIFT map of another image of the batch | the image-specific part of SIFT |
| ``rolled`` | the image's own SIFT map shifted by half the grid | the right statistics in the wrong place |
| ``mean`` | the training set's mean SIFT map (the same for every image) | a fixed, data-wide prior |
| ``uniform`` | 1 / P | any non-uniform target |
| ``random`` | fresh noise per patch (random token dropping / masking) | any ranking at all |
| ``gradient`` | per-patch Sobel magnitude | a non-SIFT saliency |
| ``foreground`` | share of non-background pixels per patch: an **oracle, not SIFT** | an upper bound |

With ``cache=True`` keypoints are detected once per training (and validation) image and mapped through each
batch's augmentation (:class:`~siftguide.relevance.cache.KeypointCache`); otherwise SIFT runs on the device on the fly.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .cache import KeypointCache
from .detector import Keypoints, check_images, detector
from .maps import (MODES, _pair, foreground_relevance, gradient_relevance, random_relevance, relevance_from_keypoints,
                   roll_relevance, shuffle_relevance)

log = logging.getLogger(__name__)

__all__ = ["RelevanceStage", "RelevanceSource", "RelevanceTarget", "KINDS"]

KINDS = ("sift", "shuffled", "rolled", "mean", "uniform", "random", "gradient", "foreground")
_SIFT_KINDS = ("sift", "shuffled", "rolled", "mean")


class RelevanceStage(nn.Module):
    """Images -> relevance ``(B, Gh, Gw)``, computed once per batch (see the module docstring).

    Args:
        kind: see the table above. mode / temperature / smoothing / uniform_mix / splat: how keypoints become
            relevance (:func:`~siftguide.relevance.maps.relevance_from_keypoints`).
        sift: detector settings (``cv2.SIFT_create`` names + ``max_keypoints``). compile: torch.compile the
            detector. seed: of the shuffled / random draws.
        cache: detect once per image (needs a datamodule whose sets hold their images in memory), kept on disk
            in ``cache_dir`` when given. mean_images: training images averaged for ``kind=mean``.
        foreground_threshold: grey-level difference to the background that makes a foreground pixel.
    """

    def __init__(self, kind: str = "sift", mode: str = "count", temperature: float = 1.0, smoothing: float = 0.0,
                 uniform_mix: float = 0.0, splat: float = 1.0, sift: dict | None = None, seed: int = 0,
                 compile: bool = False, cache: bool = False, cache_dir: str | None = None, mean_images: int = 2048,
                 foreground_threshold: float = 0.1) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown relevance kind {kind!r}; expected one of {KINDS}")
        if mode not in MODES:
            raise ValueError(f"unknown relevance mode {mode!r}; expected one of {MODES}")
        if mean_images < 1:
            raise ValueError(f"mean_images must be >= 1, got {mean_images}")
        self.kind, self.mode = kind, mode
        self.norm = dict(temperature=temperature, smoothing=smoothing, uniform_mix=uniform_mix)
        self.splat = splat
        self.sift = dict(sift or {})
        self.compile = compile
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # CPU generator: shuffling draws no device sync
        self._device_gen: torch.Generator | None = None
        self.use_cache, self.cache_dir, self.mean_images = cache, cache_dir, mean_images
        self.foreground_threshold = foreground_threshold
        self.caches: dict[str, KeypointCache] = {}
        self.register_buffer("mean_map", None, persistent=False)
        # fraction of images of the last batch without any keypoint (uniform fallback): a tensor, logged as
        # train/no_keypoint_frac, so fallbacks are counted without a host sync
        self.last_fallback: Tensor | None = None

    def reseed(self, seed: int) -> None:
        """Restart the stage's own random draws (``shuffled``, ``random``) from ``seed`` (distinct seeds per
        data-parallel rank: :meth:`PretrainModule.on_train_start`)."""
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._device_gen = None

    @property
    def uses_keypoints(self) -> bool:
        return self.kind in _SIFT_KINDS

    # ------------------------------------------------------------------------------------------ set-up
    @torch.no_grad()
    def setup(self, datamodule, transform, patch_size: int | tuple[int, int],
              device: torch.device | str = "cpu") -> None:
        """Build the keypoint caches (``cache=True``) and the mean map (``kind=mean``) from the datamodule's
        sets; ``transform.resize`` is the deterministic part of the device pipeline."""
        if self.uses_keypoints and self.use_cache:
            for stage, attr in (("train", "train_set"), ("val", "val_set")):
                images = getattr(getattr(datamodule, attr, None), "images", None)
                if images is None:
                    raise ValueError(
                        f"relevance.cache=true needs a datamodule whose {attr} holds its images in memory "
                        "(Fashion-MNIST and its variants); with image folders use relevance.cache=false"
                    )
                self.caches[stage] = KeypointCache.load_or_build(
                    images, transform.resize, self.sift, transform.size, self.cache_dir, device=device,
                ).to(device)
        if self.kind == "mean" and self.mean_map is None:
            self.mean_map = self._dataset_mean(datamodule, transform, _pair(patch_size), device)

    def _dataset_mean(self, datamodule, transform, patch: tuple[int, int], device) -> Tensor:
        grid = (transform.size[0] // patch[0], transform.size[1] // patch[1])
        total, n = torch.zeros(grid, device=device), 0
        images = getattr(getattr(datamodule, "train_set", None), "images", None)
        if "train" in self.caches:
            cache = self.caches["train"]
            for i in range(0, min(len(cache), self.mean_images), 1024):
                idx = torch.arange(i, min(i + 1024, len(cache), self.mean_images), device=device)
                total += self.from_keypoints(cache.lookup(idx), grid, patch).sum(0)
                n += len(idx)
        elif images is not None:
            for i in range(0, min(len(images), self.mean_images), 512):
                x = transform.resize(images[i : min(i + 512, self.mean_images)].to(device))
                total += self.sift_relevance(x, patch).sum(0)
                n += x.shape[0]
        else:
            for batch in datamodule.train_dataloader():
                x = transform.resize(batch["image"].to(device))[: self.mean_images - n]
                total += self.sift_relevance(x, patch).sum(0)
                n += x.shape[0]
                if n >= self.mean_images:
                    break
        if n == 0:
            raise ValueError("relevance.kind=mean: the training set is empty")
        log.info("relevance: mean SIFT map of %d training images", n)
        return (total / n).unsqueeze(0)

    # ------------------------------------------------------------------------------------------ per batch
    def from_keypoints(self, kp: Keypoints, grid: tuple[int, int], patch_size: int | tuple[int, int]) -> Tensor:
        self.last_fallback = (kp.valid.sum(1) == 0).float().mean()
        return relevance_from_keypoints(kp, grid, patch_size, self.mode, splat=self.splat, **self.norm)

    @torch.no_grad()
    def sift_relevance(self, images: Tensor, patch_size: int | tuple[int, int], index: Tensor | None = None,
                       matrix: Tensor | None = None, stage: str = "train") -> Tensor:
        """SIFT relevance with these settings, whatever the ``kind`` (also used to measure alignment). Cached
        keypoints of ``stage`` are used when ``index`` is given and a cache was built."""
        ph, pw = _pair(patch_size)
        grid = (images.shape[-2] // ph, images.shape[-1] // pw)
        cache = self.caches.get(stage)
        if cache is not None and index is not None:
            kp = cache.lookup(index, matrix, tuple(images.shape[-2:]))
        else:
            kp = detector(self.compile)(images, **self.sift)
        return self.from_keypoints(kp, grid, (ph, pw))

    @torch.no_grad()
    def forward(self, images: Tensor, patch_size: int | tuple[int, int], index: Tensor | None = None,
                matrix: Tensor | None = None, stage: str = "train") -> Tensor:
        """``(B, C, H, W)`` images in [0, 1] -> ``(B, H // ph, W // pw)`` relevance of this source's kind.
        ``index (B,)`` / ``matrix (B, 3, 3)``: dataset indices and augmentation, for cached keypoints."""
        check_images(images)
        ph, pw = _pair(patch_size)
        h, w = images.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {(ph, pw)}")
        b, grid = images.shape[0], (h // ph, w // pw)
        if self.kind == "uniform":
            return torch.full((b, *grid), 1.0 / (grid[0] * grid[1]), device=images.device)
        if self.kind == "random":
            if self._device_gen is None or self._device_gen.device != images.device:
                self._device_gen = torch.Generator(device=images.device).manual_seed(self.seed)
            return random_relevance((b, *grid), images.device, self._device_gen)
        if self.kind == "gradient":
            return gradient_relevance(images, (ph, pw), **self.norm)
        if self.kind == "foreground":
            return foreground_relevance(images, (ph, pw), self.foreground_threshold, **self.norm)
        if self.kind == "mean":
            if self.mean_map is None:
                raise RuntimeError("relevance.kind=mean needs setup(datamodule, ...) first (the module does it)")
            if tuple(self.mean_map.shape[-2:]) != grid:
                raise ValueError(f"mean map is on a {tuple(self.mean_map.shape[-2:])} grid, images give {grid}")
            return self.mean_map.to(images.device).expand(b, -1, -1)
        rel = self.sift_relevance(images, (ph, pw), index, matrix, stage)
        if self.kind == "shuffled":
            return shuffle_relevance(rel, self.generator)
        if self.kind == "rolled":
            return roll_relevance(rel)
        return rel

    def extra_repr(self) -> str:
        return f"kind={self.kind}, mode={self.mode}, {self.norm}, sift={self.sift}, cache={self.use_cache}"


RelevanceSource = RelevanceStage  # earlier names, kept for users' scripts and configs
RelevanceTarget = RelevanceStage
