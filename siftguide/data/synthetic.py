"""Generated Fashion-MNIST variants: translated, cluttered, and two spurious-correlation artefacts.

Pure batched tensor functions build the images; thin :class:`FashionMNISTDataModule` subclasses draw the
per-image parameters and call them once at ``setup``. The splits are those of Fashion-MNIST (same seeded
train/val split of the official 60k, the official 10k test apart), so runs on a variant compare directly with
runs on the plain data.

* **translated** -- each 28x28 garment rescaled to a random size (``min_size``..``max_size`` px) and put at a
  random position on a black ``canvas_size`` px canvas.
* **cluttered** -- translated, plus ``clutter_count`` random ``clutter_min``..``clutter_max`` px crops of
  *other* garments of the same official split at random positions (cluttered MNIST of Mnih et al., 2014).
* **tint** -- a uniform background grey whose level encodes the class (SIFT-invisible: a constant has no DoG
  extrema, so it gives no keypoints).
* **decoy** -- a small square in a random corner whose grey encodes the class (Decoy-MNIST of Ross et al.,
  2017; SIFT-visible: the square is a blob with corners).

Determinism: every random parameter of an image is drawn, for all images of its official split at once, from
a generator seeded by ``(split_seed, official split, parameter family)``. So an image depends only on its
official index and ``split_seed`` (the same under any ``train_subset``), the official test set uses other seeds
than the training set, and a cluttered image holds its garment exactly where the translated one does.

Images are stored as uint8 ``(N, 1, canvas_size, canvas_size)`` tensors in the datasets, like the plain
module's, so the keypoint cache (which hashes ``train_set.images``) and :class:`~siftguide.data.DeviceTransform`
work unchanged.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Sequence

import torch
from torch import Tensor

from .datamodules import FashionMNISTDataModule
from .datasets import TensorImages
from .formats import load_fashion_mnist

log = logging.getLogger(__name__)

__all__ = [
    "resize_matrix", "place_garments", "paste_clutter", "composite_over", "add_tint", "add_decoy",
    "artefact_levels", "to_uint8", "TranslatedFashionMNISTDataModule", "ClutteredFashionMNISTDataModule",
    "TintedFashionMNISTDataModule", "DecoyFashionMNISTDataModule",
]

# canvas pixels decorated at once (clutter, tint, decoy): bounds their temporaries to a few hundred MB; the
# placement runs on a whole split at once (its temporaries are per size bucket), as few large ops are much
# faster than many small ones when the CPU threads are shared
_CHUNK_PIXELS = 2**26
TEST_ARTEFACTS = ("random", "correlated", "none")
CLUTTER_BLENDS = ("over", "max")


# ----------------------------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------------------------
def resize_matrix(src: int, size: int) -> Tensor:
    """1-D resampling matrix ``(size, src)`` from ``src`` to ``size`` pixels (``R @ x @ R.T`` resizes a square).

    Output pixel ``o`` reads source coordinate ``u = (o + 0.5) * src / size - 0.5`` (pixel centres) with the triangle
    weights ``max(0, 1 - a |u - i|)``, ``a = min(1, size / src)``, normalised to sum to 1 over the source pixels:
    the same weights as ``F.interpolate(mode="bilinear", align_corners=False, antialias=size < src)`` (tested), as a
    matrix so that a whole size bucket resizes in two matmuls; ``size == src`` is the identity.
    """
    if src < 1 or size < 1:
        raise ValueError(f"src and size must be >= 1, got {src} and {size}")
    u = (torch.arange(size, dtype=torch.float64) + 0.5) * (src / size) - 0.5       # (size,)
    a = min(1.0, size / src)
    w = torch.clamp(1.0 - a * (u[:, None] - torch.arange(src, dtype=torch.float64)).abs(), min=0.0)
    return (w / w.sum(1, keepdim=True)).float()                                    # (size, src), rows sum to 1


def _float(x: Tensor) -> Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Float [0, 1] -> ``dtype`` (uint8: 0..255, rounded)."""
    return to_uint8(x) if dtype == torch.uint8 else x.to(dtype)


def to_uint8(x: Tensor) -> Tensor:
    """Float [0, 1] -> uint8 0..255, rounded."""
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def place_garments(images: Tensor, size: Tensor, xy: Tensor, canvas_size: int) -> Tensor:
    """Rescale each image to ``size x size`` px and put its top-left corner at ``xy`` on a black canvas.

    Images of one size share a :func:`resize_matrix` (two matmuls per size bucket, antialiased when shrinking);
    the results go into the canvases with one flat index assignment per bucket.

    Args:
        images: ``(N, 1, h, w)`` garments, uint8 (0..255) or float (0..1).
        size: ``(N,)`` int64 side of each placed garment in canvas pixels.
        xy: ``(N, 2)`` int64 top-left ``(x, y)`` in canvas pixels, ``0 <= xy <= canvas_size - size``.

    Returns:
        ``(N, 1, canvas_size, canvas_size)``, the dtype of ``images``.

    Example:
        >>> img = torch.full((1, 1, 28, 28), 200, dtype=torch.uint8)
        >>> out = place_garments(img, torch.tensor([14]), torch.tensor([[3, 5]]), 32)
        >>> out.shape, int(out[0, 0, 5, 3]), int(out[0, 0, 4, 3]), int(out.count_nonzero())
        (torch.Size([1, 1, 32, 32]), 200, 0, 196)
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, h, w), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if size.shape != (n,) or xy.shape != (n, 2):
        raise ValueError(f"size must be (N,) and xy (N, 2) with N={n}, got {tuple(size.shape)}, {tuple(xy.shape)}")
    if n and (int(size.min()) < 1 or int(xy.min()) < 0 or int((xy + size[:, None]).max()) > canvas_size):
        raise ValueError(f"every garment must lie inside the {canvas_size} px canvas: need size >= 1 and "
                         f"0 <= xy <= canvas_size - size")
    out = torch.zeros(n * canvas_size * canvas_size, dtype=images.dtype)
    for s in size.unique().tolist():
        sel = (size == s).nonzero().squeeze(1)                                     # (n_s,)
        if s == h == w:  # no resampling
            small = images[sel, 0]
        else:
            small = resize_matrix(h, s) @ _float(images[sel, 0]) @ resize_matrix(w, s).T  # (n_s, s, s)
            small = _like(small.clamp_(0.0, 1.0), images.dtype)
        if s == canvas_size:  # the whole canvas (xy = 0): whole rows of the output
            out.view(n, -1)[sel] = small.view(len(sel), -1)
            continue
        a = torch.arange(s)
        rows, cols = xy[sel, 1, None] + a, xy[sel, 0, None] + a                    # (n_s, s) each
        flat = (sel[:, None, None] * canvas_size + rows[:, :, None]) * canvas_size + cols[:, None, :]
        out[flat.reshape(-1)] = small.reshape(-1)
    return out.view(n, 1, canvas_size, canvas_size)


def composite_over(front: Tensor, back: Tensor, ramp: float = 0.1) -> Tensor:
    """Garment ``front`` over ``back``: ``front + (1 - alpha) * back`` with ``alpha = min(1, front / ramp)``.

    Fashion-MNIST garments lie on exact black, so their brightness serves as their (premultiplied) opacity:
    pixels at or above ``ramp`` (0.1, ~26 grey levels) are opaque and unchanged, the black surround shows ``back``
    fully, and the faint antialiased rim blends smoothly into it (no new edge around the garment); over a black
    ``back`` the garment is unchanged. Floats in [0, 1], broadcastable shapes; the result is clamped to [0, 1].
    """
    return torch.addcmul(front, (1.0 - front / ramp).clamp_(min=0.0), back).clamp_(0.0, 1.0)


def paste_clutter(canvas: Tensor, sources: Tensor, src_index: Tensor, crop_size: Tensor, crop_xy: Tensor,
                  xy: Tensor, blend: str = "over") -> Tensor:
    """Add ``K`` square crops of source images, at native resolution, to each canvas.

    Crop ``k`` of canvas ``n`` is the ``crop_size[n, k]`` px square of ``sources[src_index[n, k]]`` at
    ``crop_xy[n, k]``, put with its top-left corner at ``xy[n, k]``. ``blend="over"`` keeps the canvas' garment in front of the clutter
    (:func:`composite_over`); ``"max"`` takes the pixelwise max (cluttered MNIST). Overlapping crops combine by
    max. Only the crops' pixels are computed (one gather, one ``scatter_reduce(amax)``), not whole canvases.

    Args:
        canvas: ``(N, 1, C, C)`` uint8 or float garments on black.
        sources: ``(M, 1, h, w)`` images to crop from (same value scale as ``canvas``).
        src_index: ``(N, K)`` int64 in ``[0, M)``.
        crop_size: ``(N, K)`` int64 sides, ``1 <= crop_size <= min(h, w, C)``.
        crop_xy: ``(N, K, 2)`` int64 top-left ``(x, y)`` in the source, ``crop_xy + crop_size <= (w, h)``.
        xy: ``(N, K, 2)`` int64 top-left ``(x, y)`` on the canvas, ``xy + crop_size <= C``.

    Returns:
        ``(N, 1, C, C)``, the dtype of ``canvas``.
    """
    if canvas.ndim != 4 or canvas.shape[1] != 1 or canvas.shape[2] != canvas.shape[3]:
        raise ValueError(f"canvas must be (N, 1, C, C), got {tuple(canvas.shape)}")
    if sources.ndim != 4 or sources.shape[1] != 1:
        raise ValueError(f"sources must be (M, 1, h, w), got {tuple(sources.shape)}")
    if blend not in CLUTTER_BLENDS:
        raise ValueError(f"blend must be one of {CLUTTER_BLENDS}, got {blend!r}")
    n, k = src_index.shape
    if canvas.shape[0] != n or crop_size.shape != (n, k) or crop_xy.shape != (n, k, 2) or xy.shape != (n, k, 2):
        raise ValueError(f"with canvas (N, 1, C, C) and src_index (N, K), (N, K)={(n, k)}: crop_size must be (N, K), "
                         f"crop_xy and xy (N, K, 2); got {tuple(canvas.shape)}, {tuple(crop_size.shape)}, "
                         f"{tuple(crop_xy.shape)}, {tuple(xy.shape)}")
    if n == 0 or k == 0:
        return canvas.clone()
    _, _, h, w = sources.shape
    size = canvas.shape[-1]
    cmax = int(crop_size.max())
    a = torch.arange(cmax)
    rows = (crop_xy[..., 1, None] + a).clamp(max=h - 1)                            # (N, K, cmax)
    cols = (crop_xy[..., 0, None] + a).clamp(max=w - 1)
    src_flat = (src_index[..., None, None] * h + rows[..., :, None]) * w + cols[..., None, :]  # (N, K, cmax, cmax)
    inside = a < crop_size[..., None]                                              # (N, K, cmax)
    inside = inside[..., :, None] & inside[..., None, :]                           # (N, K, cmax, cmax)
    # canvas position of every crop pixel; pixels beyond a crop's size are sent to its last row/column with the
    # canvas' own value, which the amax below leaves unchanged
    r = (xy[..., 1, None] + a).clamp(max=size - 1)
    c = (xy[..., 0, None] + a).clamp(max=size - 1)
    dst_flat = (torch.arange(n)[:, None, None, None] * size + r[..., :, None]) * size + c[..., None, :]
    out = canvas.reshape(-1).clone()
    front = _float(out[dst_flat])                                                  # (N, K, cmax, cmax)
    clutter = _float(sources.reshape(-1)[src_flat])
    new = composite_over(front, clutter) if blend == "over" else torch.maximum(front, clutter)
    new = torch.where(inside, new, front)
    out.scatter_reduce_(0, dst_flat.reshape(-1), _like(new, canvas.dtype).reshape(-1), reduce="amax")
    return out.view_as(canvas)


def artefact_levels(codes: Tensor, base: float, step: float) -> Tensor:
    """Grey level in [0, 1] of each artefact: ``(base + step * code) / 255`` for ``codes (N,)`` (``-1``: none, 0)."""
    return torch.where(codes >= 0, (base + step * codes.float()) / 255.0, torch.zeros(()))


def add_tint(images: Tensor, level: Tensor, present: Tensor | None = None) -> Tensor:
    """Uniform background grey ``level (N,)`` (in [0, 1]) behind the garments of ``images (N, 1, H, W)``.

    The background is constant, so its difference-of-Gaussians is 0 everywhere: it adds no SIFT keypoint of its
    own (it only changes the contrast of the garment's rim). The garment stays in front (:func:`composite_over`).
    ``present (N,)`` bool: where False the image is returned unchanged. Same dtype out as in.
    """
    out = _like(composite_over(_float(images), level.view(-1, 1, 1, 1).float()), images.dtype)
    return out if present is None else torch.where(present.view(-1, 1, 1, 1), out, images)


def add_decoy(images: Tensor, level: Tensor, corner: Tensor, size: int, margin: int,
              present: Tensor | None = None) -> Tensor:
    """Paint a ``size`` px square of grey ``level (N,)`` (in [0, 1]) ``margin`` px from corner ``corner (N,)``
    (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of each image ``(N, 1, H, W)``, over everything.
    ``present (N,)`` bool: where False no square is drawn. Same dtype out as in.
    """
    n, _, h, w = images.shape
    top = torch.where(corner >= 2, h - margin - size, margin)                      # (N,)
    left = torch.where(corner % 2 == 1, w - margin - size, margin)
    yy, xx = torch.arange(h), torch.arange(w)
    in_y = (yy >= top[:, None]) & (yy < top[:, None] + size)                       # (N, H)
    in_x = (xx >= left[:, None]) & (xx < left[:, None] + size)                     # (N, W)
    mask = in_y[:, :, None] & in_x[:, None, :]                                     # (N, H, W)
    if present is not None:
        mask &= present.view(-1, 1, 1)
    value = _like(level.float(), images.dtype).view(-1, 1, 1, 1)
    return torch.where(mask.unsqueeze(1), value, images)


def _generator(split_seed: int, split: str, family: str) -> torch.Generator:
    """A generator seeded by (split seed, official split, parameter family), stable across Python runs."""
    digest = hashlib.sha256(f"siftguide.synthetic/{split_seed}/{split}/{family}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _randint(lo: Tensor | int, hi: Tensor | int, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    """Integers uniform in ``[lo, hi]`` (inclusive, tensors broadcast to ``shape``)."""
    lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
    return lo + torch.minimum((torch.rand(shape, generator=g) * (hi - lo + 1)).long(), hi - lo)


# ----------------------------------------------------------------------------------------------------------------
# DataModules
# ----------------------------------------------------------------------------------------------------------------
class TranslatedFashionMNISTDataModule(FashionMNISTDataModule):
    """Fashion-MNIST garments rescaled to ``min_size``..``max_size`` px at random places on a black
    ``canvas_size`` px canvas (uniform size, then uniform position with the garment fully inside).
    ``object_scale=[low, high]`` gives the size range as a share of the canvas side instead
    (``min_size = round(low * canvas_size)``, ``max_size = round(high * canvas_size)``): small, mid and large objects
    are one override each.

    Splits, ``val_size``, ``train_subset``, ``batch_size``... as :class:`FashionMNISTDataModule`; the images are
    generated once at ``setup`` (~70k images in a few seconds on 2 CPU cores) and depend only on their official
    index and ``split_seed``. ``canvas_size=min_size=max_size=28`` gives the plain images back.
    """

    def __init__(self, canvas_size: int = 64, min_size: int = 24, max_size: int = 44,
                 object_scale: Sequence[float] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if object_scale is not None:  # the object-size range as a share of the canvas side: sets min/max_size
            if len(object_scale) != 2 or not 0 < float(object_scale[0]) <= float(object_scale[1]) <= 1:
                raise ValueError(f"data.object_scale={list(object_scale)} must be [low, high] with 0 < low <= high <= 1 "
                                 f"(the garment's side as a share of the canvas side), e.g. [0.2, 0.35] for small objects")
            min_size = max(1, int(round(float(object_scale[0]) * canvas_size)))
            max_size = max(min_size, int(round(float(object_scale[1]) * canvas_size)))
        for key, v in (("canvas_size", canvas_size), ("min_size", min_size), ("max_size", max_size)):
            if int(v) != v:
                raise ValueError(f"data.{key} must be a whole number of pixels, got {v}")
        if canvas_size < 1:
            raise ValueError(f"data.canvas_size must be >= 1, got {canvas_size}")
        if not 1 <= min_size <= max_size:
            raise ValueError(f"data.min_size={min_size} and data.max_size={max_size} must satisfy "
                             f"1 <= min_size <= max_size: lower data.min_size or raise data.max_size")
        if max_size > canvas_size:
            raise ValueError(f"data.max_size={max_size} does not fit on the {canvas_size} px canvas: set "
                             f"data.max_size <= data.canvas_size ({canvas_size}) or enlarge data.canvas_size")
        self.canvas_size, self.min_size, self.max_size = int(canvas_size), int(min_size), int(max_size)

    # --- parameters -----------------------------------------------------------------------------------------
    def draw_params(self, n: int, split: str, labels: Tensor) -> dict[str, Tensor]:
        """Random parameters of all ``n`` images of an official ``split`` (``"train"`` or ``"test"``)."""
        g = _generator(self.split_seed, split, "place")
        size = _randint(self.min_size, self.max_size, (n,), g)
        xy = _randint(0, self.canvas_size - size[:, None], (n, 2), g)
        return {"size": size, "xy": xy}

    def decorate(self, images: Tensor, sources: Tensor, index: Tensor, params: dict[str, Tensor]) -> Tensor:
        """What a variant adds to the placed garments ``images`` (uint8 ``(n, 1, C, C)``) of the official indices
        ``index (n,)`` (rows of ``sources`` and ``params``); here nothing."""
        return images

    def generate(self, sources: Tensor, labels: Tensor, index: Tensor, split: str) -> Tensor:
        """uint8 ``(len(index), 1, C, C)`` generated images of the official ``split``'s images ``index``."""
        params = self.draw_params(len(labels), split, labels)
        placed = place_garments(sources[index], params["size"][index], params["xy"][index], self.canvas_size)
        step = max(1, _CHUNK_PIXELS // self.canvas_size**2)
        return torch.cat([self.decorate(placed[i : i + step], sources, index[i : i + step], params)
                          for i in range(0, len(index), step)] or [placed])

    # --- splits -----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        t0 = time.perf_counter()
        x, y = load_fashion_mnist(self.root, self.cache_dir, "train", self.download)
        train_idx, val_idx = self.split_indices(len(y))  # FashionMNISTDataModule's split (tested to agree)
        self.train_set = TensorImages(self.generate(x, y, train_idx, "train"), y[train_idx])
        self.val_set = TensorImages(self.generate(x, y, val_idx, "train"), y[val_idx])
        xt, yt = load_fashion_mnist(self.root, self.cache_dir, "test", self.download)
        self.test_set = TensorImages(self.generate(xt, yt, torch.arange(len(yt)), "test"), yt)
        log.info("%s: generated %d train / %d val / %d test %d px images in %.1f s", type(self).__name__,
                 len(self.train_set), len(self.val_set), len(self.test_set), self.canvas_size,
                 time.perf_counter() - t0)


class ClutteredFashionMNISTDataModule(TranslatedFashionMNISTDataModule):
    """Translated garments plus ``clutter_count`` square crops (``clutter_min``..``clutter_max`` px, native
    resolution) of *other* garments of the same official split at random canvas positions (cluttered MNIST,
    Mnih et al. 2014).

    ``clutter_blend``: ``over`` (default) puts the garment in front of the clutter (:func:`composite_over`: the
    garment keeps its own grey levels where it is opaque, clutter shows on the black surround and fades through the
    faint rim); ``max`` takes the pixelwise max as the original recipe does (clutter may brighten dark parts of the
    garment). Crops come from anywhere in the 28x28 source, so some are partly black.
    """

    def __init__(self, clutter_count: int = 4, clutter_min: int = 8, clutter_max: int = 10,
                 clutter_blend: str = "over", **kwargs) -> None:
        super().__init__(**kwargs)
        if clutter_count < 0:
            raise ValueError(f"data.clutter_count must be >= 0 (0: no clutter), got {clutter_count}")
        if not 1 <= clutter_min <= clutter_max:
            raise ValueError(f"data.clutter_min={clutter_min} and data.clutter_max={clutter_max} must satisfy "
                             f"1 <= clutter_min <= clutter_max")
        if clutter_max > min(28, self.canvas_size):
            raise ValueError(f"data.clutter_max={clutter_max} is larger than the 28 px garments or the "
                             f"{self.canvas_size} px canvas: set data.clutter_max <= {min(28, self.canvas_size)}")
        if clutter_blend not in CLUTTER_BLENDS:
            raise ValueError(f"data.clutter_blend={clutter_blend!r}: choose one of {CLUTTER_BLENDS}")
        self.clutter_count, self.clutter_min, self.clutter_max = clutter_count, clutter_min, clutter_max
        self.clutter_blend = clutter_blend

    def draw_params(self, n: int, split: str, labels: Tensor) -> dict[str, Tensor]:
        p = super().draw_params(n, split, labels)
        g, k = _generator(self.split_seed, split, "clutter"), self.clutter_count
        # another image of the same split: shift by 1..n-1 (n == 1: the image itself, nothing else exists)
        p["src"] = (torch.arange(n)[:, None] + _randint(1, max(n - 1, 1), (n, k), g)) % n
        p["crop_size"] = _randint(self.clutter_min, self.clutter_max, (n, k), g)
        p["crop_xy"] = _randint(0, 28 - p["crop_size"][..., None], (n, k, 2), g)
        p["clutter_xy"] = _randint(0, self.canvas_size - p["crop_size"][..., None], (n, k, 2), g)
        return p

    def decorate(self, images: Tensor, sources: Tensor, index: Tensor, params: dict[str, Tensor]) -> Tensor:
        return paste_clutter(super().decorate(images, sources, index, params), sources, params["src"][index],
                             params["crop_size"][index], params["crop_xy"][index], params["clutter_xy"][index],
                             self.clutter_blend)


class _ArtefactFashionMNIST(TranslatedFashionMNISTDataModule):
    """A class-coding artefact of grey ``level_base + level_step * code`` (uint8 scale): in train and val ``code``
    is the label; in test it follows ``test_artefact``: ``random`` (a class drawn independently of the label,
    so the artefact carries no information), ``correlated`` (the label, as in training) or ``none`` (no artefact).

    The default layout is the plain 28 px Fashion-MNIST (``canvas_size=min_size=max_size=28``); with a larger
    canvas and sizes the artefact goes on the translated images.
    """

    def __init__(self, level_base: float = 0, level_step: float = 0, test_artefact: str = "random",
                 canvas_size: int = 28, min_size: int = 28, max_size: int = 28, **kwargs) -> None:
        super().__init__(canvas_size=canvas_size, min_size=min_size, max_size=max_size, **kwargs)
        if test_artefact not in TEST_ARTEFACTS:
            raise ValueError(f"data.test_artefact={test_artefact!r}: choose one of {TEST_ARTEFACTS}")
        levels = [level_base + level_step * c for c in range(self.num_classes)]
        if min(levels) < 0 or max(levels) > 255:
            raise ValueError(f"data.level_base={level_base} + data.level_step={level_step} * class gives grey "
                             f"levels {min(levels)}..{max(levels)} for classes 0..{self.num_classes - 1}: keep them "
                             f"in 0..255 (uint8 scale)")
        self.level_base, self.level_step, self.test_artefact = level_base, level_step, test_artefact

    def draw_params(self, n: int, split: str, labels: Tensor) -> dict[str, Tensor]:
        p = super().draw_params(n, split, labels)
        g = _generator(self.split_seed, split, "artefact")
        random_code = _randint(0, self.num_classes - 1, (n,), g)
        p["corner"] = _randint(0, 3, (n,), g)
        mode = "correlated" if split == "train" else self.test_artefact
        p["code"] = {"correlated": labels, "random": random_code, "none": torch.full((n,), -1)}[mode]
        return p

    def artefact_level(self, code: Tensor) -> Tensor:
        return artefact_levels(code, self.level_base, self.level_step)


class TintedFashionMNISTDataModule(_ArtefactFashionMNIST):
    """SIFT-invisible artefact: a uniform background grey (default ``10 + 12 * class`` on the uint8 scale) behind
    the garment (:func:`add_tint`); see :class:`_ArtefactFashionMNIST` for the train/test coding.

    The background is constant, so it creates no DoG extremum (a blank tinted canvas has 0 keypoints); the
    garment stays in front (:func:`composite_over`).
    """

    def __init__(self, level_base: float = 10, level_step: float = 12, **kwargs) -> None:
        super().__init__(level_base=level_base, level_step=level_step, **kwargs)

    def decorate(self, images: Tensor, sources: Tensor, index: Tensor, params: dict[str, Tensor]) -> Tensor:
        code = params["code"][index]
        return add_tint(super().decorate(images, sources, index, params), self.artefact_level(code), code >= 0)


class DecoyFashionMNISTDataModule(_ArtefactFashionMNIST):
    """SIFT-visible artefact (Decoy-MNIST, Ross et al. 2017): a ``decoy_size`` px square ``decoy_margin`` px from a
    random corner (one of 4 per image), grey ``255 - 25 * class`` by default, drawn over everything
    (:func:`add_decoy`); see :class:`_ArtefactFashionMNIST` for the train/test coding.

    The default 2 px margin keeps the square clear of the SIFT border: at the model's 64 px the 4 px square of
    the 28 px image gives keypoints for every class level.
    """

    def __init__(self, level_base: float = 255, level_step: float = -25, decoy_size: int = 4, decoy_margin: int = 2,
                 **kwargs) -> None:
        super().__init__(level_base=level_base, level_step=level_step, **kwargs)
        if decoy_size < 1 or decoy_margin < 0 or decoy_size + decoy_margin > self.canvas_size:
            raise ValueError(f"data.decoy_size={decoy_size} and data.decoy_margin={decoy_margin} must satisfy "
                             f"decoy_size >= 1, decoy_margin >= 0 and decoy_size + decoy_margin <= data.canvas_size "
                             f"({self.canvas_size})")
        self.decoy_size, self.decoy_margin = decoy_size, decoy_margin

    def decorate(self, images: Tensor, sources: Tensor, index: Tensor, params: dict[str, Tensor]) -> Tensor:
        code = params["code"][index]
        return add_decoy(super().decorate(images, sources, index, params), self.artefact_level(code),
                         params["corner"][index], self.decoy_size, self.decoy_margin, code >= 0)
