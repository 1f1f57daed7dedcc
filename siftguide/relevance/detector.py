"""Batched SIFT keypoint detection (Lowe 2004, as OpenCV implements it) on any device.

Every step runs on whole batches of tensors: no per-image Python loop and no host synchronisation,
so it can run inside ``on_after_batch_transfer`` on an accelerator. The detector follows
``cv2.SIFT_create()`` step by step:

1. grey image, 2x bilinear up-sampling and a blur to ``sigma`` (the input is assumed blurred by 0.5);
2. per octave ``n_octave_layers + 3`` Gaussian images built incrementally (separable kernels from
   ``kornia.filters.get_gaussian_kernel1d``, reflect-101 borders like OpenCV); the next octave starts
   from the image of layer ``n_octave_layers`` taken at every second pixel;
3. difference of Gaussians, 3x3x3 extrema (``>=`` all 26 neighbours) above OpenCV's integer pre-threshold
   ``floor(0.5 * contrast_threshold / n_octave_layers * 255)`` grey levels, away from a 5-pixel border;
4. up to 5 Newton steps of quadratic sub-pixel/sub-scale refinement, moving to the neighbour sample when an
   offset exceeds 0.5; rejection of low contrast ``|D(x)| * n_octave_layers < contrast_threshold`` and of
   edges ``tr(H)^2 / det(H) >= (r + 1)^2 / r``.

OpenCV then assigns orientations, duplicating a keypoint for each strong orientation peak; a detector has
no use for those copies, so compare against OpenCV keypoints de-duplicated by location.

Output is fixed-size and padded (``Keypoints.valid`` marks real keypoints), sorted by response. Fixed sizes
need a budget: each octave refines its strongest ``candidate_density`` (1 %) of pixels, more than the extrema
OpenCV finds on natural photos and Fashion-MNIST (measured: at most ~0.8 % in the large octaves), and Newton
steps after the first run only on the strongest half, then quarter, of the slots (``_STEP_BUDGET``; candidates that
still move after one step are rarer than that, and the refined keypoints are the same, tested).

Built for accelerators, where the cost is the number of kernels more than their work: static shapes, no
host sync, so the whole call can be captured in a CUDA graph (:mod:`siftguide.relevance.graph`); each octave's DoG
is written into one ``(B, T)`` buffer and the candidates of all octaves are refined together, one Newton step for
all of them (derivatives as one ``(27, 10)`` matmul on the 3x3x3 cube, the 3x3 solve by cross products); extrema are
compacted into fixed slots by a cumulative count and ``searchsorted`` instead of a ``topk`` over the DoG plane: about
900 top-level aten ops per call at 64 px and 1,400 at 224 px (batch 8; ``python bench/sift.py --ops``). Everything runs in fp32 whatever the
global matmul precision (:func:`~siftguide.precision.fp32_math`).
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel1d
from torch import Tensor

from ..precision import fp32_math

__all__ = ["Keypoints", "SIFTDetector", "detect_keypoints", "compiled_detect_keypoints", "detector", "gaussian_blur",
           "rgb_to_gray", "check_images"]

_BORDER = 5  # OpenCV's SIFT_IMG_BORDER
_MAX_INTERP_STEPS = 5  # OpenCV's SIFT_MAX_INTERP_STEPS
_INIT_SIGMA = 0.5  # assumed blur of the input image
_MIN_CANDIDATES = 64  # per octave: small octaves have few pixels but a high density of extrema


@dataclass
class Keypoints:
    """Fixed-size padded batch of keypoints.

    Attributes:
        xy: ``(B, N, 2)`` pixel coordinates ``(x, y)`` in the input image, pixel centres at integers (OpenCV).
        scale: ``(B, N)`` keypoint scale sigma in input pixels (OpenCV's ``KeyPoint.size == 2 * scale``).
        response: ``(B, N)`` absolute interpolated DoG contrast in ``[0, 1]`` intensity units.
        valid: ``(B, N)`` bool, False for padding.
        octave: ``(B, N)`` long, octave index (0 is the up-sampled octave when ``upsample=True``).
    """

    xy: Tensor
    scale: Tensor
    response: Tensor
    valid: Tensor
    octave: Tensor

    def count(self) -> Tensor:
        """``(B,)`` number of valid keypoints per image."""
        return self.valid.sum(dim=1)

    def repeat(self, copies: int) -> "Keypoints":
        """The batch ``copies`` times, image-major blocks: ``(copies * B, N, ...)`` (the keypoints of every view)."""
        return Keypoints(*(t.repeat(copies, *([1] * (t.ndim - 1))) for t in
                           (self.xy, self.scale, self.response, self.valid, self.octave)))


def check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must have shape (B, C, H, W) with C = 1 or 3 and values in [0, 1], got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor with values in [0, 1], got dtype {images.dtype}")


def rgb_to_gray(images: Tensor) -> Tensor:
    """``(B, 3|1, H, W)`` -> ``(B, 1, H, W)`` with OpenCV's weights 0.299 R + 0.587 G + 0.114 B."""
    if images.shape[1] == 1:
        return images
    # Python scalars, not a weight tensor: no host -> device copy per call
    return 0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]


def _device_constant(fn):
    """Memoise a pure function of hashable settings that builds constant tensors (blur matrices, offsets, slot
    layouts). Unbounded, unlike ``lru_cache``: a recorded CUDA graph reads these tensors without owning them, so
    one must never be evicted (there are a few dozen per image size and setting). A plain dict, unlike
    ``lru_cache``: torch.compile traces ``lru_cache``-wrapped functions again on every call (it ignores the cache),
    which put the construction of every blur matrix (~900 ops, CPU tensors copied to the device) into the
    compiled graph; a filled dict is read at trace time, so the graph takes the tensors as constants."""
    cache: dict = {}

    @functools.wraps(fn)
    def cached(*args):
        out = cache.get(args)
        if out is None:
            out = cache[args] = fn(*args)
        return out

    return cached


def _reflect101_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices that pad a length-``n`` axis by ``pad`` with OpenCV's BORDER_REFLECT_101 (any ``pad``, ``n >= 1``)."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


@_device_constant
def _blur_matrix(n: int, sigma: float, device: str, dtype: torch.dtype) -> Tensor:
    """``(n, n)`` matrix ``M`` such that ``M @ v`` blurs a length-``n`` signal with OpenCV's Gaussian kernel
    (size ``round(8 sigma + 1) | 1`` for float images) and BORDER_REFLECT_101, for any ``n``."""
    ksize = _kernel_size(sigma)
    pad = ksize // 2
    kernel = get_gaussian_kernel1d(ksize, sigma, dtype=torch.float64).reshape(-1)
    src = _reflect101_index(n, pad, torch.device("cpu")).unfold(0, ksize, 1)  # (n, ksize) source index per tap
    rows = torch.arange(n).unsqueeze(1).expand_as(src)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((rows.reshape(-1), src.reshape(-1)), kernel.repeat(n), accumulate=True)
    return m.to(device=device, dtype=dtype)


def _kernel_size(sigma: float) -> int:
    return int(round(sigma * 8 + 1)) | 1


# Axes longer than this are blurred block by block (see _blur_blocks); measured on CPU, the dense matmul wins
# below it and the blocked one is ~2x faster at 448 px (bench/sift.py at 224 px, with the 2x up-sampling)
_BLOCKED_MIN = 192
_BLOCK = 64


@_device_constant
def _blur_blocks(n: int, sigma: float, device: str, dtype: torch.dtype) -> tuple[tuple[int, int, Tensor], ...]:
    """The banded blur matrix cut into consecutive row blocks ``(lo, hi, M[start:start + T, lo:hi])``: output rows
    ``start..start + T`` only read inputs ``lo..hi`` (``T + ksize - 1`` of them), so the blur costs
    ``O(n (T + ksize))`` per line instead of the dense ``O(n^2)``."""
    m = _blur_matrix(n, sigma, device, dtype)
    pad = _kernel_size(sigma) // 2
    blocks = []
    for start in range(0, n, _BLOCK):
        lo, hi = max(0, start - pad), min(n, start + _BLOCK + pad)
        blocks.append((lo, hi, m[start : start + _BLOCK, lo:hi].contiguous()))
    return tuple(blocks)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``(..., H, W)`` as OpenCV's ``GaussianBlur`` does it for float images.

    Separable, computed as ``M_h @ x @ M_w^T`` with banded matrices that fold in the reflect-101 border: on
    small images (all a SIFT pyramid has) two matmuls beat a convolution on CPU and GPU alike, and images
    smaller than the kernel need no special case. Long axes use the band only, one block of rows at a time.
    """
    h, w = x.shape[-2:]
    dev, sigma = str(x.device), float(sigma)
    if w >= _BLOCKED_MIN:
        x = torch.cat([x[..., lo:hi] @ mb.T for lo, hi, mb in _blur_blocks(w, sigma, dev, x.dtype)], dim=-1)
    else:
        x = x @ _blur_matrix(w, sigma, dev, x.dtype).T
    if h >= _BLOCKED_MIN:
        return torch.cat([mb @ x[..., lo:hi, :] for lo, hi, mb in _blur_blocks(h, sigma, dev, x.dtype)], dim=-2)
    return _blur_matrix(h, sigma, dev, x.dtype) @ x


def _layer_sigmas(sigma: float, n_layers: int) -> list[float]:
    """Incremental blur from Gaussian layer i-1 to i inside an octave (OpenCV ``buildGaussianPyramid``)."""
    k = 2.0 ** (1.0 / n_layers)
    sig = [sigma]
    for i in range(1, n_layers + 3):
        prev = k ** (i - 1) * sigma
        sig.append(math.sqrt((prev * k) ** 2 - prev**2))
    return sig


def _solve3(h: Tensor, b: Tensor) -> Tensor:
    """Solve ``h x = b`` for batches of symmetric 3x3 systems by the adjugate; singular systems give ``x = 0``.

    h: ``(..., 3, 3)`` symmetric, b: ``(..., 3)``. The adjugate's rows are cross products of h's rows (for a
    symmetric matrix the cofactor matrix is its own transpose): ``adj = [r1 x r2, r2 x r0, r0 x r1]``,
    ``det = r0 . (r1 x r2)``.
    """
    r0, r1, r2 = h.unbind(-2)
    adj = torch.stack([torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], -2)
    det = (r0 * adj[..., 0, :]).sum(-1, keepdim=True)
    safe = det.abs() > 1e-20
    x = (adj @ b.unsqueeze(-1)).squeeze(-1) / torch.where(safe, det, 1.0)
    return torch.where(safe, x, 0.0)


# (dl, dr, dc) offsets of the 3x3x3 neighbourhood, in the order of a sample's 27-value cube
_OFFSETS = [(dl, dr, dc) for dl in (-1, 0, 1) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


def _cube_index(dl: int, dr: int, dc: int) -> int:
    return (dl + 1) * 9 + (dr + 1) * 3 + (dc + 1)


def _derivative_matrix() -> list[list[float]]:
    """``(27, 10)``: a cube of DoG values times it gives, per sample, ``v, dx, dy, ds, dxx, dyy, dss, dxy, dxs,
    dys``: the value (grey levels) and OpenCV's central differences (scaled to [0, 1] intensity units like its
    ``img_scale``). One matmul instead of ~40 elementwise ops per Newton step."""
    s = 1.0 / 255.0
    m = [[0.0] * 10 for _ in range(27)]

    def put(col: int, terms: list[tuple[tuple[int, int, int], float]]) -> None:
        for off, w in terms:
            m[_cube_index(*off)][col] += w

    z = (0, 0, 0)
    put(0, [(z, 1.0)])
    axes = {1: (0, 0, 1), 2: (0, 1, 0), 3: (1, 0, 0)}  # dx (columns), dy (rows), ds (layers)
    for col, (dl, dr, dc) in axes.items():
        put(col, [((dl, dr, dc), 0.5 * s), ((-dl, -dr, -dc), -0.5 * s)])
        put(col + 3, [((dl, dr, dc), s), ((-dl, -dr, -dc), s), (z, -2.0 * s)])
    for col, (a, b) in ((7, (1, 2)), (8, (1, 3)), (9, (2, 3))):  # dxy, dxs, dys
        ua, ub = axes[a], axes[b]
        for sa in (1, -1):
            for sb in (1, -1):
                off = tuple(sa * p + sb * q for p, q in zip(ua, ub))
                put(col, [(off, 0.25 * s * sa * sb)])
    return m


_HESSIAN = [4, 7, 8, 7, 5, 9, 8, 9, 6]  # derivative columns of [[dxx, dxy, dxs], [dxy, dyy, dys], [dxs, dys, dss]]
_KEEP = [1, 2, 3, 0, 4, 5, 7]  # columns kept per converged sample: gradient, value, dxx, dyy, dxy


@_device_constant
def _constants(device: str) -> tuple[Tensor, ...]:
    """Device constants, created once (a CUDA graph captures no host -> device copy): the derivative matrix
    ``(27, 10)``, the neighbourhood offsets ``(27, 3)`` as (dl, dr, dc), the Hessian and kept-column indices, and
    the lowest (column, row, layer) of an octave's interior."""
    return (torch.tensor(_derivative_matrix(), dtype=torch.float32, device=device),
            torch.tensor(_OFFSETS, dtype=torch.long, device=device),
            torch.tensor(_HESSIAN, dtype=torch.long, device=device),
            torch.tensor(_KEEP, dtype=torch.long, device=device),
            torch.tensor([_BORDER, _BORDER, 1], dtype=torch.long, device=device))


def _max3x3_interior(x: Tensor, op) -> Tensor:
    """``op``-reduce (max or min) over 3x3 neighbourhoods of ``(..., h, w)`` for the samples at least ``_BORDER``
    pixels from the edge: ``(..., h - 2 B, w - 2 B)``. Separable shifted reductions on slices, no padding."""
    h, w = x.shape[-2:]
    b = _BORDER
    rows = x[..., b - 1 : h - b + 1, :]
    m = op(op(rows[..., b - 1 : w - b - 1], rows[..., b : w - b]), rows[..., b + 1 : w - b + 1])
    return op(op(m[..., :-2, :], m[..., 1:-1, :]), m[..., 2:, :])


# Share of the candidate slots that each Newton step can still work on. Steps are cheap, but five of them over
# every candidate slot took up to ~30 % of the detector's time; a candidate that has not converged after step 1 (2) is
# rare: measured per image at most 28 % (16 %) of the slots on photos at 64-224 px and Fashion-MNIST at 64 px
# (bench/sift.py images), so later steps run on the strongest half (quarter) of the slots only, the slots of all
# octaves together. A candidate that would need a later step but is not among them is rejected, like one that never
# converges.
_STEP_BUDGET = (1.0, 0.5, 0.25, 0.25, 0.25)
assert len(_STEP_BUDGET) == _MAX_INTERP_STEPS


def _octave_candidates(dog: Tensor, n_layers: int, threshold: float, k: int, cap: int) -> tuple[Tensor, Tensor]:
    """The ``k`` strongest 3x3x3 DoG extrema of one octave, in fixed slots.

    dog: ``(B, n_layers + 2, h, w)`` in grey levels. A sample is an extremum iff it equals the max (min) of its
    27-neighbourhood and exceeds OpenCV's pre-threshold. Extrema are compacted into ``cap >= k`` slots in raster
    order (a cumulative count and a ``searchsorted`` per slot: no pass over the plane beyond the count, no host
    sync), and the ``k`` of largest ``|DoG|`` kept: the strongest ``k`` of the octave unless it has more than
    ``cap`` extrema.

    Returns ``pos (B, k, 3)`` long as (column, row, layer) and ``score (B, k)`` (``|DoG|``, -1 for empty slots).
    """
    b, _, h, w = dog.shape
    ih, iw = h - 2 * _BORDER, w - 2 * _BORDER
    mid = dog[:, 1 : n_layers + 1, _BORDER : h - _BORDER, _BORDER : w - _BORDER]  # (B, L, ih, iw)
    # max (min) over the layer below/itself/above first, then 3x3 spatial shifts, for the interior only
    mx = _max3x3_interior(torch.maximum(torch.maximum(dog[:, :-2], dog[:, 1:-1]), dog[:, 2:]), torch.maximum)
    mn = _max3x3_interior(torch.minimum(torch.minimum(dog[:, :-2], dog[:, 1:-1]), dog[:, 2:]), torch.minimum)
    ext = ((mid > threshold) & (mid >= mx)) | ((mid < -threshold) & (mid <= mn))
    m = n_layers * ih * iw
    count = ext.flatten(1).cumsum(1, dtype=torch.int32)  # (B, m): extrema up to each sample
    rank = torch.arange(1, cap + 1, dtype=torch.int32, device=dog.device).repeat(b, 1)
    idx = torch.searchsorted(count, rank)  # (B, cap): sample of the j-th extremum, m when there are fewer
    found = idx < m
    idx = idx.clamp_max(m - 1)
    layer, rest = idx.div(ih * iw, rounding_mode="floor") + 1, idx.remainder(ih * iw)
    r, c = rest.div(iw, rounding_mode="floor") + _BORDER, rest.remainder(iw) + _BORDER
    pos = torch.stack([c, r, layer], -1)
    score = torch.where(found, dog.flatten(1).gather(1, (layer * h + r) * w + c).abs(), -1.0)
    if cap > k:
        score, sel = score.topk(k, dim=1)
        pos = pos.gather(1, sel.unsqueeze(-1).expand(-1, -1, 3))
    return pos, score


def _newton_step(dog: Tensor, fstate: Tensor, istate: Tensor, flags: Tensor,
                 n_layers: int) -> tuple[Tensor, Tensor, Tensor]:
    """One step of OpenCV's ``adjustLocalExtrema`` for every slot of every octave at once.

    dog: ``(B, T)`` the DoG of all octaves, flattened and concatenated. Per slot ``(B, K, .)``: ``fstate`` (offset 3,
    gradient 3, value 1, dxx dyy dxy 3) of the sample it converged at; ``istate`` long (column, row, layer, octave
    offset in ``dog``, octave width, octave height); ``flags`` bool (active, converged).
    """
    deriv, nb, hidx, keep, lo = _constants(str(dog.device))
    c, r, layer, off, w, h = istate.unbind(-1)
    active, converged = flags.unbind(-1)
    lin = off + (layer * h + r) * w + c  # (B, K) sample in dog
    # (B, K, 27) samples of the 3x3x3 neighbourhood (integer index arithmetic: no integer matmul on CUDA)
    idx = lin.unsqueeze(-1) + (h * w).unsqueeze(-1) * nb[:, 0] + w.unsqueeze(-1) * nb[:, 1] + nb[:, 2]
    cube = dog.gather(1, idx.flatten(1)).view(*lin.shape, 27)
    d = cube @ deriv  # (B, K, 10): value and derivatives
    x = -_solve3(d[..., hidx].unflatten(-1, (3, 3)), d[..., 1:4])
    small = (x.abs() < 0.5).all(-1)
    now = active & small
    fstate = torch.where(now.unsqueeze(-1), torch.cat([x, d[..., keep]], -1), fstate)
    converged = converged | now
    # OpenCV rejects numerically exploding offsets before moving; a move out of the octave's interior (or of
    # layers 1..n_layers) rejects the candidate: it keeps its last sample, inactive and unconverged
    active = active & ~small & (x.abs() < 1e9).all(-1)
    moved = istate[..., :3] + torch.where(active.unsqueeze(-1), x.round(), 0.0).long()
    inside = ((moved >= lo).all(-1) & (moved[..., :2] < istate[..., 4:6] - _BORDER).all(-1)
              & (moved[..., 2] <= n_layers))
    active = active & inside
    istate = torch.cat([torch.where(active.unsqueeze(-1), moved, istate[..., :3]), istate[..., 3:]], -1)
    return fstate, istate, torch.stack([active, converged], -1)


def _refine(dog: Tensor, pos: Tensor, score: Tensor, layout: Tensor, n_layers: int) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``_MAX_INTERP_STEPS`` Newton steps for the candidate slots of all octaves together.

    dog ``(B, T)``; pos ``(B, K, 3)`` (column, row, layer); score ``(B, K)`` (``|DoG|``, <= 0 for empty slots);
    layout ``(K, 3)`` long: each slot's octave offset in ``dog``, width and height. Steps after the first work on
    the strongest active slots only (``_STEP_BUDGET``). Returns ``fstate (B, K, 10)``, ``istate (B, K, 6)`` and
    ``converged (B, K)`` (see :func:`_newton_step`).
    """
    b, k, _ = pos.shape
    fstate = pos.new_zeros(b, k, 10, dtype=dog.dtype)
    istate = torch.cat([pos, layout.expand(b, -1, -1)], -1)
    valid = score > 0
    flags = torch.stack([valid, torch.zeros_like(valid)], -1)
    full: tuple[Tensor, ...] = ()  # every slot's state, kept once the steps work on a subset
    ids: Tensor | None = None  # slots the steps work on (None: all)
    for frac in _STEP_BUDGET:
        kk = max(1, min(k, math.ceil(frac * k)))
        if kk < fstate.shape[1]:  # keep the strongest kk slots that are still active
            if ids is None:
                full = (fstate, istate, flags)
            else:
                _scatter_state(full, ids, (fstate, istate, flags))
            _, sel = torch.where(flags[..., 0], score, -2.0).topk(kk, dim=1)
            ids = sel if ids is None else ids.gather(1, sel)
            score = score.gather(1, sel)
            fstate, istate, flags = (t.gather(1, sel.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
                                     for t in (fstate, istate, flags))
        fstate, istate, flags = _newton_step(dog, fstate, istate, flags, n_layers)
    if ids is not None:
        _scatter_state(full, ids, (fstate, istate, flags))
        fstate, istate, flags = full
    return fstate, istate, flags[..., 1]


def _scatter_state(full: tuple[Tensor, ...], ids: Tensor, part: tuple[Tensor, ...]) -> None:
    """Write the state of the slots ``ids (B, k)`` back into the full ``(B, K, ...)`` state, in place."""
    for t, p in zip(full, part):
        t.scatter_(1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]), p)


@_device_constant
def _slot_layout(octaves: tuple[tuple[int, int, int, int], ...], coord_scale: float,
                 device: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per candidate slot, for octaves given as (offset in the concatenated DoG, width, height, slots): ``(K, 3)``
    long (offset, width, height), ``(K,)`` long octave index and ``(K,)`` float octave pixel size in input pixels.
    Created once per image size and settings, on the device."""
    rows = [(off, w, h, o) for o, (off, w, h, k) in enumerate(octaves) for _ in range(k)]
    t = torch.tensor(rows, dtype=torch.long)
    return (t[:, :3].to(device), t[:, 3].to(device), (coord_scale * 2.0 ** t[:, 3].double()).float().to(device))


def _octave_sizes(h: int, w: int, n_octaves: int) -> list[tuple[int, int]]:
    """(height, width) of each octave that has samples away from the border (the next octave takes every second
    pixel: ``ceil(n / 2)``)."""
    sizes = []
    for _ in range(max(n_octaves, 1)):
        if min(h, w) <= 2 * _BORDER:
            break  # no sample left away from the border, nor in any smaller octave
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


def _detect(images: Tensor, max_keypoints: int, max_candidates: int | None, candidate_density: float,
            n_octave_layers: int, sigma: float, contrast_threshold: float, edge_threshold: float, upsample: bool,
            refine: bool) -> Keypoints:
    """:func:`detect_keypoints` without the checks and the fp32 context: the traceable, capturable core."""
    # work in grey levels 0..255 so OpenCV's integer pre-threshold applies unchanged
    gray = rgb_to_gray(images.float()) * 255.0
    b = gray.shape[0]
    if upsample:
        gray = F.interpolate(gray, scale_factor=2.0, mode="bilinear", align_corners=False)
        init = _INIT_SIGMA * 2
    else:
        init = _INIT_SIGMA
    n_layers = n_octave_layers
    g = gaussian_blur(gray, math.sqrt(max(sigma**2 - init**2, 0.01)))
    n_octaves = int(round(math.log2(min(g.shape[-2:])) - 2)) + (1 if upsample else 0)
    sizes = _octave_sizes(*g.shape[-2:], n_octaves)
    if not sizes:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} are too small for SIFT: need more than "
                         f"{2 * _BORDER} pixels per side (after the optional 2x up-sampling)")
    threshold = math.floor(0.5 * contrast_threshold / n_layers * 255)
    sig = _layer_sigmas(sigma, n_layers)
    # per octave: offset of its DoG in the concatenated (B, T) buffer, width, height, candidate slots; and the
    # compaction's capacity, twice the uncapped slots (max_candidates keeps the strongest of all of those)
    octaves, caps, t = [], [], 0
    for h, w in sizes:
        area = (h - 2 * _BORDER) * (w - 2 * _BORDER)
        k = max(_MIN_CANDIDATES, math.ceil(candidate_density * area))
        octaves.append((t, w, h, min(k, max_candidates or k, n_layers * area)))
        caps.append(min(2 * k, n_layers * area))
        t += (n_layers + 2) * h * w
    # every octave's DoG in one buffer (octave o from offset octaves[o][0]): one gather for the merged refinement.
    # Eager, each octave's difference is written straight into it (`out=`); torch.compile cannot trace a write
    # through such a view (a graph break that sent the whole detector back to eager), so compiled, the octaves
    # are concatenated at the end (one copy of the DoG, which inductor may fuse into the subtraction)
    compiling = torch.compiler.is_compiling()
    dog = None if compiling else gray.new_empty(b, t)
    dogs, pos, score = [], [], []
    for o, (off, w, h, k) in enumerate(octaves):
        if o > 0:  # next octave: layer n_layers of the previous one, every second pixel
            g = gauss[n_layers][..., ::2, ::2]
        gauss = [g]
        for i in range(1, n_layers + 3):
            gauss.append(gaussian_blur(gauss[-1], sig[i]))
        stack = torch.cat(gauss, dim=1)  # (B, L + 3, h, w)
        if compiling:
            d = stack[:, 1:] - stack[:, :-1]  # (B, L + 2, h, w)
            dogs.append(d.reshape(b, -1))
        else:
            d = dog[:, off : off + (n_layers + 2) * h * w].view(b, n_layers + 2, h, w)
            torch.sub(stack[:, 1:], stack[:, :-1], out=d)
        p, s = _octave_candidates(d, n_layers, threshold, k, caps[o])
        pos.append(p)
        score.append(s)
    if compiling:
        dog = torch.cat(dogs, 1)
    pos, score = torch.cat(pos, 1), torch.cat(score, 1)  # (B, K, 3), (B, K)
    layout, octave, px = _slot_layout(tuple(octaves), 0.5 if upsample else 1.0, str(dog.device))
    if refine:
        fstate, istate, valid = _refine(dog, pos, score, layout, n_layers)  # never-converged: rejected (OpenCV)
        off, grad, center, hess2 = fstate.split([3, 3, 1, 3], -1)
        contr = center.squeeze(-1) / 255.0 + 0.5 * (grad * off).sum(-1)
        dxx, dyy, dxy = hess2.unbind(-1)
        tr, det = dxx + dyy, dxx * dyy - dxy * dxy
        valid = valid & (det > 0) & (tr * tr * edge_threshold < (edge_threshold + 1) ** 2 * det)
        pos = istate[..., :3]
    else:
        valid = score > 0
        off = torch.zeros_like(pos, dtype=dog.dtype)
    c, r, layer = pos.unbind(-1)
    lin = layout[:, 0] + (layer * layout[:, 2] + r) * layout[:, 1] + c  # (B, K) sample in dog: unique per octave
    if not refine:
        contr = dog.gather(1, lin) / 255.0
    valid = valid & (contr.abs() * n_layers >= contrast_threshold)
    # refinement may bring two candidates to the same sample: keep one (OpenCV's removeDuplicated)
    k = lin.shape[1]
    key, order = torch.where(valid, lin, -1 - torch.arange(k, device=lin.device)).sort(dim=1)
    dup = torch.zeros_like(valid)
    dup[:, 1:] = key[:, 1:] == key[:, :-1]
    valid = valid & ~torch.zeros_like(valid).scatter(1, order, dup)
    xy = (pos[..., :2] + off[..., :2]) * px.unsqueeze(-1)
    scale = sigma * torch.pow(2.0, (layer + off[..., 2]) / n_layers) * px
    # the strongest max_keypoints, padded to that fixed size
    n = min(max_keypoints, k)
    _, idx = torch.where(valid, contr.abs(), -1.0).topk(n, dim=1)
    out = Keypoints(xy.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2)), scale.gather(1, idx),
                    contr.abs().gather(1, idx), valid.gather(1, idx), octave.expand(b, -1).gather(1, idx))
    if n < max_keypoints:
        p = max_keypoints - n
        out = Keypoints(F.pad(out.xy, (0, 0, 0, p)), F.pad(out.scale, (0, p)), F.pad(out.response, (0, p)),
                        F.pad(out.valid, (0, p)), F.pad(out.octave, (0, p)))
    return out


def _check_settings(max_keypoints: int, max_candidates: int | None, candidate_density: float) -> None:
    if max_keypoints < 1:
        raise ValueError(f"max_keypoints must be >= 1, got {max_keypoints}")
    if not candidate_density > 0 or (max_candidates is not None and max_candidates < 1):
        raise ValueError(f"candidate_density must be > 0 and max_candidates >= 1 (or None), got "
                         f"{candidate_density} and {max_candidates}")


@torch.no_grad()
def detect_keypoints(
    images: Tensor,
    *,
    max_keypoints: int = 512,
    max_candidates: int | None = None,
    candidate_density: float = 0.01,
    n_octave_layers: int = 3,
    sigma: float = 1.6,
    contrast_threshold: float = 0.04,
    edge_threshold: float = 10.0,
    upsample: bool = True,
    refine: bool = True,
) -> Keypoints:
    """Detect SIFT keypoints in a batch of images.

    Computed in full fp32 whatever the surrounding precision: autocast off, and TF32 / bf16 matmuls off even where
    ``torch.set_float32_matmul_precision`` allowed them (:func:`~siftguide.precision.fp32_math`).

    Args:
        images: ``(B, C, H, W)`` float images, ``C`` 1 or 3 (RGB), values in ``[0, 1]``, any device and dtype
            (computed in float32).
        max_keypoints: ``N``, size of the padded output; the strongest responses are kept.
        max_candidates: optional cap on the DoG extrema refined per octave (strongest ``|DoG|`` first).
        candidate_density: DoG extrema refined per octave, as a fraction of the octave's pixels away from the
            border (at least ``_MIN_CANDIDATES``). The cost of refinement is proportional to it; OpenCV's
            detector finds at most ~0.6 % (natural photos, 64-224 px) to ~0.8 % (Fashion-MNIST) extrema per
            octave pixel in the large octaves, so the default 1 % refines all of them there.
        n_octave_layers, sigma, contrast_threshold, edge_threshold: as in ``cv2.SIFT_create``.
        upsample: double the image first (OpenCV's ``firstOctave = -1``).
        refine: quadratic sub-pixel/sub-scale refinement with contrast and edge tests (OpenCV always refines).

    Returns:
        :class:`Keypoints` with ``xy (B, N, 2)``, ``scale``, ``response``, ``valid``, ``octave`` ``(B, N)``.

    Example:
        >>> img = torch.zeros(2, 1, 64, 64); img[:, :, 28:36, 28:36] = 1.0
        >>> kp = detect_keypoints(img)
        >>> bool(kp.valid.any())
        True
    """
    check_images(images)
    _check_settings(max_keypoints, max_candidates, candidate_density)
    with fp32_math():
        return _detect(images, max_keypoints, max_candidates, candidate_density, n_octave_layers, sigma,
                       contrast_threshold, edge_threshold, upsample, refine)


@functools.lru_cache(maxsize=1)
def compiled_detect_keypoints():
    """:func:`detect_keypoints` compiled with ``torch.compile`` (created once, shared), for static shapes.

    Same keypoints (tested), fused elementwise passes: see ``python bench/sift.py --compile`` for its speed.
    Compiling takes minutes on a small CPU, once per process and input shape (inductor's on-disk cache makes later
    processes faster), so it pays off in long runs at a fixed image and batch size (training drops the last
    incomplete batch), not in short tests. Each new shape compiles its own graph: static-shape code is faster
    than the dynamic-shape graph torch would otherwise build on the second shape.
    """
    core = torch.compile(_detect, dynamic=False)  # the checks and the fp32 flags stay outside the graph
    defaults = {k: p.default for k, p in inspect.signature(detect_keypoints).parameters.items() if k != "images"}
    seen: set = set()

    @torch.no_grad()
    def compiled(images: Tensor, **kwargs) -> Keypoints:
        settings = {**defaults, **kwargs}
        check_images(images)
        _check_settings(settings["max_keypoints"], settings["max_candidates"], settings["candidate_density"])
        key = (tuple(images.shape), images.dtype, images.device, tuple(sorted(settings.items())))
        with fp32_math():
            if key not in seen:  # first call of a shape: eager, which fills the device constants' caches, so the
                seen.add(key)    # graph compiled at the next call takes them as constants (one compile, not two)
                return _detect(images, **settings)
            return core(images, **settings)

    return compiled


def detector(compile: bool = False):
    """:func:`detect_keypoints`, or its compiled version when ``compile``."""
    return compiled_detect_keypoints() if compile else detect_keypoints


class SIFTDetector(torch.nn.Module):
    """Thin module around :func:`detect_keypoints` storing its settings (for configs); ``compile`` uses
    :func:`compiled_detect_keypoints`."""

    def __init__(
        self, max_keypoints: int = 512, n_octave_layers: int = 3, sigma: float = 1.6,
        contrast_threshold: float = 0.04, edge_threshold: float = 10.0, upsample: bool = True, refine: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.kwargs = dict(
            max_keypoints=max_keypoints, n_octave_layers=n_octave_layers, sigma=sigma,
            contrast_threshold=contrast_threshold, edge_threshold=edge_threshold, upsample=upsample, refine=refine,
        )
        self.compile = compile

    def forward(self, images: Tensor) -> Keypoints:
        return detector(self.compile)(images, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
