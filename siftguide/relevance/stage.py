"""The relevance stage: one object produces each batch's patch relevance for every guidance mode that consumes it.

:class:`RelevanceStage` owns the map kind (SIFT or a wrong-map control), the relevance settings, the keypoint caches
and the dataset-mean map. Each map is ``(B, Gh, Gw)``, >= 0, summing to 1 per image:

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

Composition with the dataset prior (``sift``, ``shuffled``, ``rolled``): with ``prior_mix = lambda > 0`` or
``min_keypoints > 0`` each image's map ``r`` is combined with the dataset-mean map ``m``
(:func:`~siftguide.relevance.maps.compose_with_prior`): ``(1 - l) r + l m`` (``prior_form=mixture``) or
``m^l r^(1 - l)`` renormalised (``product``), where ``l = 1 - (1 - lambda) min(1, n / min_keypoints)`` for an image
with ``n`` keypoints (``l = lambda`` when ``min_keypoints = 0``). An image without keypoints then gets the mean map,
not the uniform one. The controls compose the same way: ``shuffled`` mixes the prior with another image's map (and
that image's keypoint count). ``prior_mix = 0, min_keypoints = 0`` skips the composition.

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
Caches and the mean map are made by :meth:`RelevanceStage.setup`, which the run's set-up owner
(:class:`~siftguide.callbacks.relevance_setup.RelevanceSetup`) calls with the datasets and the data pipeline's
deterministic resize; the stage never changes a datamodule or a dataset.
"""
from __future__ import annotations

import logging
import tempfile
from typing import Callable

import torch
from torch import Tensor, nn

from ..rng import RandomStream
from .cache import KeypointCache, pack_keypoints, transform_keypoints, unpack_keypoints
from .detector import Keypoints, check_images, detect_keypoints
from .folder_cache import VERIFY, FolderKeypointCache, supports_folder_cache
from .graph import BACKENDS, Captured
from .maps import (MODES, PRIOR_FORMS, _pair, compose_with_prior, dog_relevance, foreground_relevance,
                   gradient_relevance, random_relevance, relevance_from_keypoints, roll_relevance, shuffle_shift)

log = logging.getLogger(__name__)

__all__ = ["RelevanceStage", "KINDS"]

KINDS = ("sift", "shuffled", "rolled", "mean", "uniform", "random", "gradient", "foreground")
_SIFT_KINDS = ("sift", "shuffled", "rolled", "mean")
_COMPOSED_KINDS = ("sift", "shuffled", "rolled")
Stats = dict[str, Tensor]


class RelevanceStage(nn.Module):
    """Images -> ``(relevance (B, Gh, Gw), stats)``, computed once per batch (see the module docstring).

    Args:
        kind: see the table above. mode / temperature / smoothing / uniform_mix / splat: how keypoints become
            relevance (:func:`~siftguide.relevance.maps.relevance_from_keypoints`); ``mode=dog``: the dense map of
            :func:`~siftguide.relevance.maps.dog_relevance` instead (no keypoints: no cache, no count).
        prior_mix: ``lambda`` in [0, 1], the dataset-mean map's weight in each image's map (0: the image's map
            alone). prior_form: ``mixture`` or ``product``. min_keypoints: images with fewer keypoints lean on the
            mean map in proportion (0: off). See the module docstring.
        sift: detector settings (``cv2.SIFT_create`` names + ``max_keypoints``). seed: of the shuffled / random
            draws (:class:`~siftguide.rng.RandomStream` ``rng``).
        backend: how on-the-fly detection runs: ``auto`` (a CUDA graph on GPUs, eager elsewhere), ``eager``,
            ``graph``, ``compile`` (:class:`~siftguide.relevance.graph.Captured`).
        cache: ``auto`` | ``true`` | ``false`` (see the module docstring); kept on disk in ``cache_dir`` (required
            by the folder cache: a temporary directory when null). cache_verify: how the folder cache checks that a
            file is unchanged (:meth:`~siftguide.relevance.folder_cache.FolderKeypointCache.prepare`). mean_images:
            training images averaged for the dataset-mean map.
        prefetch: detect the next training batch's keypoints on a side CUDA stream while the current step runs
            (``auto``: on CUDA when detection is on the fly; ``true`` also on CPU, synchronously, for tests).
        foreground_threshold: grey-level difference to the background that makes a foreground pixel.
    """

    def __init__(self, kind: str = "sift", mode: str = "count", temperature: float = 1.0, smoothing: float = 0.0,
                 uniform_mix: float = 0.0, splat: float = 1.0, prior_mix: float = 0.0, prior_form: str = "mixture",
                 min_keypoints: float = 0, sift: dict | None = None, seed: int = 0, cache: bool | str = "auto",
                 cache_dir: str | None = None, cache_verify: str = "auto", mean_images: int = 2048,
                 foreground_threshold: float = 0.1, backend: str = "auto", prefetch: bool | str = "auto") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown relevance.kind {kind!r}; expected one of {KINDS}")
        if mode not in MODES:
            raise ValueError(f"unknown relevance.mode {mode!r}; expected one of {MODES}")
        if not 0.0 <= float(prior_mix) <= 1.0:
            raise ValueError(f"relevance.prior_mix={prior_mix} must be in [0, 1]: the weight of the dataset-mean map "
                             f"in each image's map (0: the image's map alone, 1: the mean map)")
        if prior_form not in PRIOR_FORMS:
            raise ValueError(f"relevance.prior_form={prior_form!r}: choose one of {PRIOR_FORMS}")
        if float(min_keypoints) < 0:
            raise ValueError(f"relevance.min_keypoints={min_keypoints} must be >= 0 (a keypoint count; 0: off)")
        if mode == "dog" and float(min_keypoints) > 0:
            raise ValueError("relevance.min_keypoints counts keypoints, and relevance.mode=dog uses none: set "
                             "relevance.min_keypoints=0 (use prior_mix to compose the dense map with the mean map)")
        if mean_images < 1:
            raise ValueError(f"relevance.mean_images must be >= 1, got {mean_images}")
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
        self.prior_mix, self.prior_form, self.min_keypoints = float(prior_mix), prior_form, float(min_keypoints)
        self.sift = dict(sift or {})
        self.backend, self.prefetch = backend, prefetch
        self._captured: dict[tuple, Captured] = {}
        # shuffled: a CPU generator (the shift is read on the host, no device sync); random: the batch's device
        self.rng = RandomStream(seed)
        if cache_verify not in VERIFY:
            raise ValueError(f"relevance.cache_verify must be one of {VERIFY}, got {cache_verify!r}")
        self.use_cache, self.cache_dir, self.cache_verify, self.mean_images = cache, cache_dir, cache_verify, mean_images
        self.foreground_threshold = foreground_threshold
        self.caches: dict[str, KeypointCache] = {}  # in-memory datasets, by stage
        self.folder_caches: dict[str, FolderKeypointCache] = {}  # datasets of files, by stage
        self.register_buffer("mean_map", None, persistent=False)

    @property
    def uses_keypoints(self) -> bool:
        """Whether this stage's maps come from keypoints (cached or detected): a SIFT kind, not ``mode=dog``."""
        return self.kind in _SIFT_KINDS and self.mode != "dog"

    @property
    def composes(self) -> bool:
        """Whether per-image maps are composed with the dataset-mean map."""
        return self.kind in _COMPOSED_KINDS and (self.prior_mix > 0 or self.min_keypoints > 0)

    @property
    def needs_mean_map(self) -> bool:
        return self.kind == "mean" or self.composes

    # ------------------------------------------------------------------------------------------ set-up
    @torch.no_grad()
    def setup(self, datasets: dict[str, object], prepare: Callable[[Tensor], Tensor], image_size: tuple[int, int],
              patch_size: int | tuple[int, int], device: torch.device | str = "cpu", batch_size: int = 256,
              num_workers: int = 0) -> dict[str, FolderKeypointCache]:
        """Build or load the keypoint caches (``cache`` auto / true) of ``datasets`` (``{"train": ..., "val":
        ...}``, protocol datasets) and the dataset-mean map (``kind=mean`` or a composition). ``prepare`` is the
        data pipeline's deterministic resize to ``image_size``. Returns the folder caches made for datasets of files
        (by stage): the caller makes their batches carry the keypoints
        (:class:`~siftguide.relevance.folder_cache.WithKeypoints`)."""
        made = {}
        if self.uses_keypoints and self.use_cache != "false":
            for stage, ds in datasets.items():
                if stage in self.caches or stage in self.folder_caches:  # set up by an earlier fit
                    continue
                cache = self._setup_cache(ds, stage, prepare, image_size, device, batch_size, num_workers)
                if cache is not None:
                    made[stage] = cache
        if self.needs_mean_map and self.mean_map is None:
            self.mean_map = self._dataset_mean(datasets.get("train"), prepare, image_size, _pair(patch_size), device)
        return made

    def _setup_cache(self, ds, stage: str, prepare, image_size, device, batch_size: int,
                     num_workers: int) -> FolderKeypointCache | None:
        if ds is None:
            return None
        folder = getattr(ds, "cache", None)
        if isinstance(folder, FolderKeypointCache):  # already carries its keypoints (an earlier fit)
            self.folder_caches[stage] = folder
            return None
        images = getattr(ds, "images", None)
        if images is not None:
            self.caches[stage] = KeypointCache.load_or_build(
                images, prepare, self.sift, image_size, self.cache_dir, device=device).to(device)
        elif supports_folder_cache(ds):
            cache = FolderKeypointCache.prepare(
                ds, prepare, self.sift, image_size, self.cache_dir or tempfile.gettempdir(), device=device,
                batch_size=max(64, batch_size), num_workers=num_workers, verify=self.cache_verify)
            self.folder_caches[stage] = cache
            return cache
        elif self.use_cache == "true":
            raise ValueError(
                f"relevance.cache=true needs a {stage} dataset that holds its images in memory (Fashion-MNIST and its "
                f"variants) or is a dataset of files (image folders: `samples` = [(path, label), ...]); "
                f"{type(ds).__name__} is neither. Use relevance.cache=auto (detect on the fly where no cache is "
                f"possible) or relevance.cache=false")
        else:
            log.info("relevance.cache=auto: the %s dataset (%s) holds neither images in memory nor files: keypoints "
                     "are detected on the fly", stage, type(ds).__name__)
        return None

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

    def _dataset_mean(self, ds, prepare, image_size, patch: tuple[int, int], device) -> Tensor:
        """``(1, Gh, Gw)``: the mean of the first ``mean_images`` training images' own SIFT maps (un-augmented)."""
        grid = (image_size[0] // patch[0], image_size[1] // patch[1])
        total, n = torch.zeros(grid, device=device), 0
        limit = min(len(ds), self.mean_images) if ds is not None else 0
        if "train" in self.caches:
            cache = self.caches["train"]
            for i in range(0, limit, 1024):
                idx = torch.arange(i, min(i + 1024, limit), device=device)
                total += self.from_keypoints(cache.lookup(idx), grid, patch).sum(0)
                n += len(idx)
        elif "train" in self.folder_caches:
            folder = self.folder_caches["train"]
            for i in range(0, limit, 1024):
                packed, count = folder.rows(slice(i, min(i + 1024, limit)))
                kp = unpack_keypoints(torch.from_numpy(packed).to(device), torch.from_numpy(count))
                total += self.from_keypoints(kp, grid, patch).sum(0)
                n += len(count)
        elif getattr(ds, "images", None) is not None:
            for i in range(0, limit, 512):
                x = prepare(ds.images[i : min(i + 512, limit)].to(device))
                total += self.sift_relevance(x, patch)[0].sum(0)
                n += x.shape[0]
        elif ds is not None:
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(limit)), batch_size=256)
            for batch in loader:
                ok = batch.get("valid", torch.ones(len(batch["image"]), dtype=torch.bool))
                x = prepare(batch["image"][ok].to(device))
                total += self.sift_relevance(x, patch)[0].sum(0)
                n += x.shape[0]
        if n == 0:
            raise ValueError("the dataset-mean map (relevance.kind=mean, prior_mix or min_keypoints) needs training "
                             "images, and the training set is empty")
        log.info("relevance: mean SIFT map of %d training images", n)
        return (total / n).unsqueeze(0)

    # ------------------------------------------------------------------------------------------ per batch
    def from_keypoints(self, kp: Keypoints, grid: tuple[int, int], patch_size: int | tuple[int, int]) -> Tensor:
        """``(B, Gh, Gw)`` maps of these settings from keypoints (no composition)."""
        return relevance_from_keypoints(kp, grid, patch_size, self.mode, splat=self.splat, **self.norm)

    @torch.no_grad()
    def sift_relevance(self, images: Tensor, patch_size: int | tuple[int, int], index: Tensor | None = None,
                       matrix: Tensor | None = None, stage: str = "train",
                       keypoints: Keypoints | None = None) -> tuple[Tensor, Tensor | None]:
        """Each image's own SIFT map with these settings, whatever the ``kind`` (also used to measure alignment),
        and its keypoint count ``(B,)`` (None for ``mode=dog``), from the first source that applies: ``keypoints`` carried by the batch (of
        the un-augmented images), the in-memory cache of ``stage`` by ``index`` (both mapped through ``matrix``),
        or detection on ``images``."""
        ph, pw = _pair(patch_size)
        grid = (images.shape[-2] // ph, images.shape[-1] // pw)
        if self.mode == "dog":  # dense, from the images themselves: no keypoints, no count
            return dog_relevance(images, (ph, pw), self.sift.get("sigma", 1.6), self.sift.get("n_octave_layers", 3),
                                 **self.norm), None
        cache = self.caches.get(stage)
        if keypoints is not None:
            kp = transform_keypoints(keypoints, matrix, tuple(images.shape[-2:]))
        elif cache is not None and index is not None:
            kp = cache.lookup(index, matrix, tuple(images.shape[-2:]))
        else:  # on the fly: detection and map in one captured call
            return self._on_the_fly(grid, (ph, pw))(images)
        return self.from_keypoints(kp, grid, (ph, pw)), kp.valid.sum(1)

    def _on_the_fly(self, grid: tuple[int, int], patch: tuple[int, int]) -> Captured:
        key = ("map", grid, patch)
        if key not in self._captured:
            sift, mode, splat, norm = dict(self.sift), self.mode, self.splat, dict(self.norm)

            def sift_map(x: Tensor) -> tuple[Tensor, Tensor]:
                kp = detect_keypoints(x, **sift)
                return relevance_from_keypoints(kp, grid, patch, mode, splat=splat, **norm), kp.valid.sum(1)

            self._captured[key] = Captured(sift_map, self.backend)
        return self._captured[key]

    @staticmethod
    def keypoints_of(batch: dict) -> Keypoints | None:
        """The keypoints a batch carries (folder cache, prefetch), or None."""
        if "keypoints" not in batch:
            return None
        return unpack_keypoints(batch["keypoints"], batch["keypoint_count"])

    def _mean(self, b: int, grid: tuple[int, int], device) -> Tensor:
        if self.mean_map is None:
            raise RuntimeError("the dataset-mean map (relevance.kind=mean, prior_mix, min_keypoints) is made by "
                               "setup(...) first (the run's RelevanceSetup callback calls it)")
        if tuple(self.mean_map.shape[-2:]) != grid:
            raise ValueError(f"mean map is on a {tuple(self.mean_map.shape[-2:])} grid, images give {grid}")
        return self.mean_map.to(device).expand(b, -1, -1)

    @torch.no_grad()
    def forward(self, images: Tensor, patch_size: int | tuple[int, int], index: Tensor | None = None,
                matrix: Tensor | None = None, stage: str = "train",
                keypoints: Keypoints | None = None) -> tuple[Tensor, Stats]:
        """``(B, C, H, W)`` images in [0, 1] at the model's size -> ``(B, H // ph, W // pw)`` relevance of this
        stage's kind (``B`` may be several views of each image, view-major: ``index`` and ``keypoints`` of the images
        are repeated to match), and what was measured on the way: ``{"no_keypoint_frac": ()}`` (share of images without any
        keypoint) for the kinds that use keypoints, else ``{}`` (device tensors: no host sync).
        ``index (B,)`` / ``matrix (B, 3, 3)`` / ``keypoints``: dataset indices, augmentation and the keypoints the
        batch carries, for cached or prefetched keypoints (see :meth:`sift_relevance`)."""
        check_images(images)
        ph, pw = _pair(patch_size)
        h, w = images.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {(ph, pw)}")
        b, grid = images.shape[0], (h // ph, w // pw)
        if index is not None and len(index) != b:  # several views per image, view-major: the images' own repeat
            index = index.repeat(b // len(index))
        if keypoints is not None and keypoints.xy.shape[0] != b:
            keypoints = keypoints.repeat(b // keypoints.xy.shape[0])
        if self.kind == "uniform":
            return torch.full((b, *grid), 1.0 / (grid[0] * grid[1]), device=images.device), {}
        if self.kind == "random":
            return random_relevance((b, *grid), images.device, self.rng.generator(images.device)), {}
        if self.kind == "gradient":
            return gradient_relevance(images, (ph, pw), **self.norm), {}
        if self.kind == "foreground":
            return foreground_relevance(images, (ph, pw), self.foreground_threshold, **self.norm), {}
        if self.kind == "mean":
            return self._mean(b, grid, images.device), {}
        rel, count = self.sift_relevance(images, (ph, pw), index, matrix, stage, keypoints)
        stats = {} if count is None else {"no_keypoint_frac": (count == 0).float().mean()}
        if self.kind == "shuffled":  # another image's map, with that image's keypoint count
            shift = shuffle_shift(b, self.rng.generator("cpu"))
            rel, count = rel.roll(shift, 0), None if count is None else count.roll(shift, 0)
        elif self.kind == "rolled":
            rel = roll_relevance(rel)
        if self.composes:
            rel = compose_with_prior(rel, self._mean(b, grid, images.device), self.prior_mix, count,
                                     self.min_keypoints, self.prior_form)
        return rel, stats

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, mode={self.mode}, {self.norm}, prior_mix={self.prior_mix}, "
                f"prior_form={self.prior_form}, min_keypoints={self.min_keypoints}, sift={self.sift}, "
                f"cache={self.use_cache}, backend={self.backend}, prefetch={self.prefetch}")
