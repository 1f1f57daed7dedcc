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

Where keypoints come from, per batch (the first that applies):

1. keypoints carried in the batch (``batch["keypoints"]``, ``batch["keypoint_count"]``): read from the on-disk folder
   cache by the loader workers (:class:`~siftguide.relevance.folder_cache.FolderKeypointCache`), or detected ahead on
   a side CUDA stream (:class:`~siftguide.relevance.prefetch.DevicePrefetcher`), in both cases on the un-augmented
   image, then mapped through the batch's augmentation matrix;
2. the in-memory cache of a dataset that holds its images (Fashion-MNIST and its variants,
   :class:`~siftguide.relevance.cache.KeypointCache`), by ``batch["index"]``, mapped the same way;
3. detection on the augmented batch, on the fly (a CUDA graph on GPUs: :class:`~siftguide.relevance.graph.Captured`).

``cache=auto`` (the default) uses a cache wherever the data allows it (in-memory images, or a dataset of files) and
detects on the fly otherwise; ``true`` demands one (a clear error where the data has none); ``false`` never uses one.
"""
from __future__ import annotations

import logging
import tempfile

import torch
from torch import Tensor, nn

from .cache import KeypointCache, pack_keypoints, transform_keypoints, unpack_keypoints
from .detector import Keypoints, check_images, detect_keypoints
from .folder_cache import FolderKeypointCache, WithKeypoints, supports_folder_cache
from .graph import BACKENDS, Captured
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
        sift: detector settings (``cv2.SIFT_create`` names + ``max_keypoints``). seed: of the shuffled / random
            draws.
        backend: how on-the-fly detection runs: ``auto`` (a CUDA graph on GPUs, eager elsewhere), ``eager``,
            ``graph``, ``compile`` (:class:`~siftguide.relevance.graph.Captured`). compile: the older switch for
            ``backend=compile``.
        cache: ``auto`` | ``true`` | ``false`` (see the module docstring); kept on disk in ``cache_dir`` (required
            by the folder cache: a temporary directory when null). mean_images: training images averaged for
            ``kind=mean``.
        prefetch: detect the next training batch's keypoints on a side CUDA stream while the current step runs
            (``auto``: on CUDA when detection is on the fly; ``true`` also on CPU, synchronously, for tests).
        foreground_threshold: grey-level difference to the background that makes a foreground pixel.
    """

    def __init__(self, kind: str = "sift", mode: str = "count", temperature: float = 1.0, smoothing: float = 0.0,
                 uniform_mix: float = 0.0, splat: float = 1.0, sift: dict | None = None, seed: int = 0,
                 compile: bool = False, cache: bool | str = "auto", cache_dir: str | None = None,
                 mean_images: int = 2048, foreground_threshold: float = 0.1, backend: str = "auto",
                 prefetch: bool | str = "auto") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown relevance kind {kind!r}; expected one of {KINDS}")
        if mode not in MODES:
            raise ValueError(f"unknown relevance mode {mode!r}; expected one of {MODES}")
        if mean_images < 1:
            raise ValueError(f"mean_images must be >= 1, got {mean_images}")
        cache, prefetch = str(cache).lower(), str(prefetch).lower()
        if cache not in ("auto", "true", "false"):
            raise ValueError(f"relevance.cache must be auto, true or false, got {cache!r}")
        if prefetch not in ("auto", "true", "false"):
            raise ValueError(f"relevance.prefetch must be auto, true or false, got {prefetch!r}")
        if backend not in BACKENDS:
            raise ValueError(f"relevance.backend must be one of {BACKENDS}, got {backend!r}")
        self.kind, self.mode = kind, mode
        self.norm = dict(temperature=temperature, smoothing=smoothing, uniform_mix=uniform_mix)
        self.splat = splat
        self.sift = dict(sift or {})
        self.backend = "compile" if compile else backend
        self.prefetch = prefetch
        self._captured: dict[tuple, Captured] = {}
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # CPU generator: shuffling draws no device sync
        self._device_gen: torch.Generator | None = None
        self.use_cache, self.cache_dir, self.mean_images = cache, cache_dir, mean_images
        self.foreground_threshold = foreground_threshold
        self.caches: dict[str, KeypointCache] = {}  # in-memory datasets, by stage
        self.folder_caches: dict[str, FolderKeypointCache] = {}  # datasets of files, by stage
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
        """Build or load the keypoint caches (``cache`` auto / true) and the mean map (``kind=mean``) from the
        datamodule's sets; ``transform.resize`` is the deterministic part of the device pipeline. A dataset of
        files is wrapped (:class:`~siftguide.relevance.folder_cache.WithKeypoints`) so that its batches carry
        their keypoints."""
        if self.uses_keypoints and self.use_cache != "false":
            for stage, attr in (("train", "train_set"), ("val", "val_set")):
                self._setup_cache(datamodule, attr, stage, transform, device)
        if self.kind == "mean" and self.mean_map is None:
            self.mean_map = self._dataset_mean(datamodule, transform, _pair(patch_size), device)

    def _setup_cache(self, datamodule, attr: str, stage: str, transform, device) -> None:
        ds = getattr(datamodule, attr, None)
        if isinstance(ds, WithKeypoints):  # set up by an earlier fit of this datamodule
            self.folder_caches[stage] = ds.cache
            return
        images = getattr(ds, "images", None)
        if images is not None:
            self.caches[stage] = KeypointCache.load_or_build(
                images, transform.resize, self.sift, transform.size, self.cache_dir, device=device).to(device)
        elif ds is not None and supports_folder_cache(ds):
            directory = self.cache_dir or tempfile.gettempdir()
            cache = FolderKeypointCache.prepare(
                ds, transform.resize, self.sift, transform.size, directory, device=device,
                batch_size=max(64, int(getattr(datamodule, "batch_size", 256) or 256)),
                num_workers=int(getattr(datamodule, "num_workers", 0) or 0))
            self.folder_caches[stage] = cache
            setattr(datamodule, attr, WithKeypoints(ds, cache))
        elif self.use_cache == "true":
            raise ValueError(
                f"relevance.cache=true needs a datamodule whose {attr} holds its images in memory (Fashion-MNIST "
                f"and its variants) or is a dataset of files (image folders: `samples` = [(path, label), ...]); "
                f"{type(datamodule).__name__}.{attr} is neither. Use relevance.cache=auto (detect on the fly "
                f"where no cache is possible) or relevance.cache=false")
        else:
            log.info("relevance.cache=auto: %s.%s holds neither images in memory nor files: keypoints are detected "
                     "on the fly", type(datamodule).__name__, attr)

    def prefetching(self, device: torch.device) -> bool:
        """Whether training batches should have their keypoints detected ahead (see ``prefetch``)."""
        if not self.uses_keypoints or self.prefetch == "false" or "train" in self.caches \
                or "train" in self.folder_caches:
            return False
        return self.prefetch == "true" or torch.device(device).type == "cuda"

    @torch.no_grad()
    def batch_keypoints(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Packed keypoints ``(B, N, 4)`` float32 and counts ``(B,)`` of un-augmented images in [0, 1] (what the
        prefetcher puts in a batch); detection and packing in one captured call (its outputs are tensors, copied
        out of the graph)."""
        if "packed" not in self._captured:
            sift = dict(self.sift)
            # runs on the prefetcher's side stream: a plain CUDA graph even with backend=compile, whose
            # cudagraph trees share one memory pool and assume their graphs replay one after another on one stream
            # (a side-stream replay could overlap a main-stream one, e.g. validation's)
            self._captured["packed"] = Captured(
                lambda x: pack_keypoints(detect_keypoints(x, **sift), dtype=torch.float32),
                "graph" if self.backend == "compile" else self.backend)
        return self._captured["packed"](images)

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
        elif "train" in self.folder_caches:
            folder = self.folder_caches["train"]
            for i in range(0, min(len(folder), self.mean_images), 1024):
                packed, count = folder.rows(slice(i, min(i + 1024, len(folder), self.mean_images)))
                kp = unpack_keypoints(torch.from_numpy(packed).to(device), torch.from_numpy(count))
                total += self.from_keypoints(kp, grid, patch).sum(0)
                n += len(count)
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
                       matrix: Tensor | None = None, stage: str = "train",
                       keypoints: Keypoints | None = None) -> Tensor:
        """SIFT relevance with these settings, whatever the ``kind`` (also used to measure alignment), from the
        first source that applies: ``keypoints`` carried by the batch (of the un-augmented images), the in-memory
        cache of ``stage`` by ``index`` (both mapped through ``matrix``), or detection on ``images``."""
        ph, pw = _pair(patch_size)
        grid = (images.shape[-2] // ph, images.shape[-1] // pw)
        cache = self.caches.get(stage)
        if keypoints is not None:
            kp = transform_keypoints(keypoints, matrix, tuple(images.shape[-2:]))
        elif cache is not None and index is not None:
            kp = cache.lookup(index, matrix, tuple(images.shape[-2:]))
        else:  # on the fly: detection and map in one captured call
            rel, self.last_fallback = self._on_the_fly(grid, (ph, pw))(images)
            return rel
        return self.from_keypoints(kp, grid, (ph, pw))

    def _on_the_fly(self, grid: tuple[int, int], patch: tuple[int, int]) -> Captured:
        key = ("map", grid, patch)
        if key not in self._captured:
            sift, mode, splat, norm = dict(self.sift), self.mode, self.splat, dict(self.norm)

            def sift_map(x: Tensor) -> tuple[Tensor, Tensor]:
                kp = detect_keypoints(x, **sift)
                rel = relevance_from_keypoints(kp, grid, patch, mode, splat=splat, **norm)
                return rel, (kp.valid.sum(1) == 0).float().mean()

            self._captured[key] = Captured(sift_map, self.backend)
        return self._captured[key]

    @staticmethod
    def keypoints_of(batch: dict) -> Keypoints | None:
        """The keypoints a batch carries (folder cache, prefetch), or None."""
        if "keypoints" not in batch:
            return None
        return unpack_keypoints(batch["keypoints"], batch["keypoint_count"])

    @torch.no_grad()
    def forward(self, images: Tensor, patch_size: int | tuple[int, int], index: Tensor | None = None,
                matrix: Tensor | None = None, stage: str = "train", keypoints: Keypoints | None = None) -> Tensor:
        """``(B, C, H, W)`` images in [0, 1] -> ``(B, H // ph, W // pw)`` relevance of this stage's kind.
        ``index (B,)`` / ``matrix (B, 3, 3)`` / ``keypoints``: dataset indices, augmentation and the keypoints the
        batch carries, for cached or prefetched keypoints (see :meth:`sift_relevance`)."""
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
        rel = self.sift_relevance(images, (ph, pw), index, matrix, stage, keypoints)
        if self.kind == "shuffled":
            return shuffle_relevance(rel, self.generator)
        if self.kind == "rolled":
            return roll_relevance(rel)
        return rel

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, mode={self.mode}, {self.norm}, sift={self.sift}, cache={self.use_cache}, "
                f"backend={self.backend}, prefetch={self.prefetch}")


RelevanceSource = RelevanceStage  # earlier names, kept for users' scripts and configs
RelevanceTarget = RelevanceStage
