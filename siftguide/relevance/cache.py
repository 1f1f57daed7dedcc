"""Keypoint cache: detect SIFT once per training image, reuse it under every augmentation.

SIFT keypoints are covariant with similarity transforms, so instead of detecting keypoints on every augmented
batch, the cache stores the keypoints of each (resized, un-augmented) training image and maps them through the
augmentation that was applied to the image: positions by the chained kornia transform matrix ``M``
(``(B, 3, 3)``, input pixels -> output pixels), scales by ``sqrt(|det M[:2, :2]|)``; keypoints that leave the
output image are dropped. Relevance is then computed from these keypoints exactly as on the fly, for every
mode (count, response, gaussian). The per-step cost is a gather and a 3x3 matrix product.

Stored per image: ``max_keypoints`` x (x, y, scale, response) float32 (1 KiB for 64 keypoints). The cache is
kept in memory and, when ``directory`` is set, on disk under a key made of the images' content hash, the image
size and the detector settings, so sweeps reuse one detection pass.

Distributed (DDP, any ``torch.distributed`` process group): the cache is built once for all ranks, not once per
rank. Rank 0 looks for it on disk (its file system: nodes need not share one) and broadcasts it; otherwise every
rank detects the keypoints of its contiguous share of the images, the shares are all-gathered (each image is
detected once, in ``1 / world_size`` of the time) and rank 0 saves the whole cache. Collectives: every rank
must call :meth:`KeypointCache.load_or_build` (the module does so in ``on_fit_start``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .detector import Keypoints, detect_keypoints
from .progress import BuildProgress

log = logging.getLogger(__name__)

__all__ = ["KeypointCache", "transform_keypoints", "pack_keypoints", "unpack_keypoints"]

_VERSION = 2  # part of the on-disk key: bump whenever the detector's output changes (2: adaptive candidates)


def transform_keypoints(kp: Keypoints, matrix: Tensor | None, size: tuple[int, int]) -> Keypoints:
    """Map keypoints through homogeneous ``(B, 3, 3)`` pixel transforms; drop those outside ``size = (H, W)``."""
    if matrix is None:
        return kp
    if matrix.shape[-2:] != (3, 3) or matrix.shape[0] != kp.xy.shape[0]:
        raise ValueError(f"matrix must be (B, 3, 3) with B = {kp.xy.shape[0]}, got {tuple(matrix.shape)}")
    m = matrix.to(kp.xy.dtype)
    xy1 = torch.cat([kp.xy, torch.ones_like(kp.xy[..., :1])], dim=-1)  # (B, N, 3)
    p = xy1 @ m.transpose(1, 2)
    xy = p[..., :2] / p[..., 2:3]
    # 2x2 determinant by hand: torch.linalg.det may synchronise with the host on CUDA
    zoom = (m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]).abs().sqrt().unsqueeze(1)  # (B, 1)
    h, w = size
    inside = (xy[..., 0] >= -0.5) & (xy[..., 0] < w - 0.5) & (xy[..., 1] >= -0.5) & (xy[..., 1] < h - 0.5)
    return Keypoints(xy, kp.scale * zoom, kp.response, kp.valid & inside, kp.octave)


def pack_keypoints(kp: Keypoints, dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor]:
    """``(B, N, 4)`` (x, y, scale, response) in ``dtype`` and ``(B,)`` int16 counts: the valid keypoints first
    (detector output is sorted by response, valid first). How keypoints are stored on disk and carried in
    batches."""
    packed = torch.stack([kp.xy[..., 0], kp.xy[..., 1], kp.scale, kp.response], -1)
    packed = torch.where(kp.valid.unsqueeze(-1), packed, 0.0).to(dtype)
    return packed, kp.valid.sum(1).to(torch.int16)


def unpack_keypoints(packed: Tensor, count: Tensor) -> Keypoints:
    """Inverse of :func:`pack_keypoints` (float32 out): ``(B, N, 4)`` and ``(B,)`` -> :class:`Keypoints`."""
    p = packed.float()
    valid = torch.arange(p.shape[1], device=p.device) < count.to(p.device).long().unsqueeze(1)
    return Keypoints(p[..., :2], p[..., 2], p[..., 3], valid, torch.zeros_like(valid, dtype=torch.long))


class KeypointCache:
    """Keypoints of every training image, indexed by the dataset index carried in each batch.

    Args:
        xy: ``(N, K, 2)``; scale, response: ``(N, K)``; valid: ``(N, K)`` bool.
    """

    def __init__(self, xy: Tensor, scale: Tensor, response: Tensor, valid: Tensor) -> None:
        self.xy, self.scale, self.response, self.valid = xy, scale, response, valid

    def __len__(self) -> int:
        return self.xy.shape[0]

    def to(self, device: torch.device | str) -> "KeypointCache":
        return KeypointCache(self.xy.to(device), self.scale.to(device), self.response.to(device),
                             self.valid.to(device))

    def lookup(self, index: Tensor, matrix: Tensor | None = None, size: tuple[int, int] | None = None) -> Keypoints:
        """Keypoints of the images ``index (B,)``, mapped through the augmentation ``matrix (B, 3, 3)``."""
        # bounds check only on CPU: on an accelerator it would be a host sync every step
        if index.device.type == "cpu" and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"cache holds {len(self)} images; batch index out of range")
        index = index.to(self.xy.device)
        kp = Keypoints(self.xy[index], self.scale[index], self.response[index], self.valid[index],
                       torch.zeros_like(self.valid[index], dtype=torch.long))
        return transform_keypoints(kp, matrix, size) if matrix is not None else kp

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    @torch.no_grad()
    def build(cls, images: Tensor, prepare, sift: dict, batch_size: int = 512, device: torch.device | str = "cpu",
              progress: bool = True, progress_every_s: float = 30.0) -> "KeypointCache":
        """Detect keypoints for all ``images (N, C, h, w)`` after ``prepare`` (e.g. the deterministic resize of
        the device pipeline), in batches on ``device``, showing its progress
        (:class:`~siftguide.relevance.progress.BuildProgress`)."""
        out = []
        bar = BuildProgress(len(images), "keypoint cache", log, progress_every_s, enabled=progress)
        for i in range(0, len(images), batch_size):
            x = prepare(images[i : i + batch_size].to(device))
            kp = detect_keypoints(x, **sift)
            out.append((kp.xy.cpu(), kp.scale.cpu(), kp.response.cpu(), kp.valid.cpu()))
            bar.update(x.shape[0])
        bar.close()
        return cls(*(torch.cat(t) for t in zip(*out)))

    @classmethod
    def load_or_build(cls, images: Tensor, prepare, sift: dict, image_size: tuple[int, int],
                      directory: str | Path | None = None, batch_size: int = 512,
                      device: torch.device | str = "cpu") -> "KeypointCache":
        """Load the cache for these images and settings from ``directory``, or build (and save) it; under an
        initialised process group, once for all ranks (see the module docstring)."""
        path = Path(directory) / f"keypoints-{cls.key(images, sift, image_size)}.pt" if directory else None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        loaded = [cls._load(path) if rank == 0 and path is not None and path.exists() else None]
        if world > 1:
            dist.broadcast_object_list(loaded, src=0)  # rank 0's file reaches ranks on other nodes
        if loaded[0] is not None:
            return loaded[0]
        import time

        t0 = time.perf_counter()
        if world > 1:
            share = torch.tensor_split(torch.arange(len(images)), world)[rank]  # contiguous: rank order = image order
            part = cls.build(images[share], prepare, sift, batch_size, device)
            parts = [None] * world
            dist.all_gather_object(parts, part._tensors())
            cache = cls(*(torch.cat(t) for t in zip(*parts)))
        else:
            cache = cls.build(images, prepare, sift, batch_size, device)
        log.info("keypoint cache: detected keypoints of %d images in %.1f s on %d process(es) (%.1f per image on "
                 "average)", len(cache), time.perf_counter() - t0, world, float(cache.valid.sum(1).float().mean()))
        if path is not None and rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(dict(zip(("xy", "scale", "response", "valid"), cache._tensors())), tmp)
            tmp.replace(path)  # atomic: concurrent sweep jobs never read a half-written file
        return cache

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.xy.cpu(), self.scale.cpu(), self.response.cpu(), self.valid.cpu()

    @classmethod
    def _load(cls, path: Path) -> "KeypointCache | None":
        """The cache saved at ``path``; None (and a warning naming the file, which is removed so that it is built
        again) when the file cannot be read or does not hold a cache."""
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            cache = cls(d["xy"], d["scale"], d["response"], d["valid"])
            if not (len(cache.xy) == len(cache.scale) == len(cache.response) == len(cache.valid)):
                raise ValueError("its arrays have different lengths")
        except Exception as e:  # noqa: BLE001 - torn zip, wrong content, unreadable: all mean "build it again"
            log.warning("keypoint cache file %s is unreadable or corrupt (%s: %s): detecting the keypoints again and "
                        "replacing it", path, type(e).__name__, str(e)[:200])
            try:
                path.unlink()
            except OSError:
                pass
            return None
        log.info("keypoint cache: loaded %d images from %s", len(cache), path)
        return cache

    @staticmethod
    def key(images: Tensor, sift: dict, image_size: tuple[int, int]) -> str:
        h = hashlib.sha1()
        h.update(images.contiguous().cpu().numpy().tobytes())
        h.update(json.dumps({"sift": sift, "size": list(image_size), "shape": list(images.shape), "v": _VERSION},
                            sort_keys=True).encode())
        return h.hexdigest()[:16]
