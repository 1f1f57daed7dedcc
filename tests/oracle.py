"""Test and benchmark helpers: OpenCV SIFT as an oracle, real photos that ship with scikit-image.

OpenCV and scikit-image are development dependencies (``pip install -e .[dev]``) and are imported lazily. A test
helper, not part of the package (it was ``siftguide.testing``): the tests and the ``bench/`` scripts import it as
``tests.oracle`` with the repository root on ``sys.path``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from siftguide.relevance import Keypoints, counts_from_keypoints

# real photographs bundled inside the scikit-image wheel (no download needed)
PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "rocket.jpg", "page.png", "text.png", "clock_motion.png", "horse.png",
)


def photo_batch(size: int, crops_per_photo: int = 2, seed: int = 0) -> Tensor:
    """``(N, 1, size, size)`` uint8 grey crops of the bundled photos, resized with area interpolation.

    Crop ``0`` of each photo is the central square; the others are random squares of >= half the short side.
    """
    import cv2
    import skimage

    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    rng = np.random.default_rng(seed)
    out = []
    for name in PHOTOS:
        img = cv2.imread(os.path.join(root, name), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise FileNotFoundError(f"photo {name} not found in {root}; install scikit-image (pip install -e .[dev])")
        h, w = img.shape
        for i in range(crops_per_photo):
            side = min(h, w) if i == 0 else int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            y0 = (h - side) // 2 if i == 0 else int(rng.integers(0, h - side + 1))
            x0 = (w - side) // 2 if i == 0 else int(rng.integers(0, w - side + 1))
            crop = img[y0 : y0 + side, x0 : x0 + side]
            out.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


def opencv_keypoints(images_u8: Tensor, **sift_kwargs) -> list[np.ndarray]:
    """OpenCV SIFT keypoint locations per image, ``(n_i, 2)`` arrays of (x, y), de-duplicated by location
    (OpenCV repeats a keypoint once per dominant orientation)."""
    import cv2

    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 1:
        raise ValueError(f"expected uint8 images of shape (B, 1, H, W), got {images_u8.dtype} {tuple(images_u8.shape)}")
    sift = cv2.SIFT_create(**sift_kwargs)
    out = []
    for img in images_u8[:, 0].cpu().numpy():
        pts = np.array([k.pt for k in sift.detect(img, None)], dtype=np.float64).reshape(-1, 2)
        out.append(np.unique(np.round(pts, 3), axis=0))
    return out


def opencv_patch_counts(points: list[np.ndarray], grid: tuple[int, int], patch_size: int) -> Tensor:
    """``(B, Gh, Gw)`` per-patch counts of OpenCV keypoints, binned exactly like ``counts_from_keypoints``."""
    n = max(1, max(len(p) for p in points))
    xy = torch.zeros(len(points), n, 2)
    valid = torch.zeros(len(points), n, dtype=torch.bool)
    for i, p in enumerate(points):
        xy[i, : len(p)] = torch.from_numpy(p).float()
        valid[i, : len(p)] = True
    z = torch.zeros(len(points), n)
    return counts_from_keypoints(Keypoints(xy, z, z, valid, z.long()), grid, patch_size)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-row Spearman rank correlation of ``(B, M)`` tensors (average ranks for ties); NaN for constant rows.
    The batched implementation of :func:`siftguide.analysis.metrics.spearman`, in float64."""
    from siftguide.analysis.metrics import spearman as batched

    return batched(a.double(), b.double())


def agreement(kp: Keypoints, points: list[np.ndarray], grid: tuple[int, int], patch_size: int, radius: float = 2.0):
    """Agreement of detected keypoints with OpenCV's: mean per-image Spearman rho of per-patch counts
    (images where either map is constant are skipped) and recall of OpenCV keypoints within ``radius`` px.

    Returns ``dict(rho=..., recall=..., n_ours=..., n_opencv=..., n_images_rho=...)``.
    """
    ours = counts_from_keypoints(kp, grid, patch_size).flatten(1)
    ref = opencv_patch_counts(points, grid, patch_size).flatten(1)
    rho = spearman(ours, ref)
    ok = ~torch.isnan(rho)
    hits, total = 0, 0
    for i, p in enumerate(points):
        mine = kp.xy[i][kp.valid[i]].double().cpu()
        total += len(p)
        if len(p) and len(mine):
            d = torch.cdist(torch.from_numpy(p), mine).min(dim=1).values
            hits += int((d <= radius).sum())
    return dict(
        rho=float(rho[ok].mean()) if ok.any() else float("nan"),
        recall=hits / max(total, 1),
        n_ours=float(kp.valid.sum(1).float().mean()),
        n_opencv=float(np.mean([len(p) for p in points])),
        n_images_rho=int(ok.sum()),
    )
