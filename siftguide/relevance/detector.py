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
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel1d
from torch import Tensor

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


def _reflect101_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices that pad a length-``n`` axis by ``pad`` with OpenCV's BORDER_REFLECT_101 (any ``pad``, ``n >= 1``)."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


@functools.lru_cache(maxsize=128)
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


@functools.lru_cache(maxsize=128)
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


def _solve3(h: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Solve ``h x = b`` for batches of 3x3 systems by the adjugate; singular systems give ``x = 0``.

    h: (..., 3, 3) symmetric, b: (..., 3). Returns x (..., 3) and the determinant (...).
    """
    a, bb, c = h[..., 0, 0], h[..., 0, 1], h[..., 0, 2]
    d, e, f = h[..., 1, 1], h[..., 1, 2], h[..., 2, 2]
    # cofactors of a symmetric matrix [[a, bb, c], [bb, d, e], [c, e, f]]
    c00 = d * f - e * e
    c01 = c * e - bb * f
    c02 = bb * e - c * d
    c11 = a * f - c * c
    c12 = bb * c - a * e
    c22 = a * d - bb * bb
    det = a * c00 + bb * c01 + c * c02
    adj = torch.stack(
        [torch.stack([c00, c01, c02], -1), torch.stack([c01, c11, c12], -1), torch.stack([c02, c12, c22], -1)], -2
    )
    safe = det.abs() > 1e-20
    x = (adj @ b.unsqueeze(-1)).squeeze(-1) / torch.where(safe, det, torch.ones_like(det)).unsqueeze(-1)
    return torch.where(safe.unsqueeze(-1), x, torch.zeros_like(x)), det


# (dl, dr, dc) offsets of the 3x3x3 neighbourhood, in a fixed order used by _gather_cube
_OFFSETS = [(dl, dr, dc) for dl in (-1, 0, 1) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


@functools.lru_cache(maxsize=16)
def _offsets(device: str) -> Tensor:
    """``(27, 3)`` neighbourhood offsets on ``device``, created once (no host -> device copy per call)."""
    return torch.tensor(_OFFSETS, device=device)


def _gather_cube(dog_flat: Tensor, layer: Tensor, r: Tensor, c: Tensor, h: int, w: int) -> Tensor:
    """Values of the 3x3x3 neighbourhoods around (layer, r, c): ``(B, K)`` indices -> ``(B, K, 3, 3, 3)``."""
    off = _offsets(str(dog_flat.device))  # (27, 3)
    ll = layer.unsqueeze(-1) + off[:, 0]
    rr = r.unsqueeze(-1) + off[:, 1]
    cc = c.unsqueeze(-1) + off[:, 2]
    n_layers = dog_flat.shape[1] // (h * w)
    # clamp so that rejected candidates still index in range; their values are masked out later
    idx = (ll.clamp(0, n_layers - 1) * h + rr.clamp(0, h - 1)) * w + cc.clamp(0, w - 1)  # (B, K, 27)
    vals = dog_flat.gather(1, idx.flatten(1)).view(*idx.shape)
    return vals.view(*idx.shape[:2], 3, 3, 3)


def _derivatives(cube: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient ``(B, K, 3)`` as (dx, dy, ds) and Hessian ``(B, K, 3, 3)`` by central differences on the cube
    (in 0..255 grey-level units, scaled to [0, 1] units like OpenCV's ``img_scale``)."""
    s = 1.0 / 255.0
    v = cube[..., 1, 1, 1]
    dx = (cube[..., 1, 1, 2] - cube[..., 1, 1, 0]) * 0.5 * s
    dy = (cube[..., 1, 2, 1] - cube[..., 1, 0, 1]) * 0.5 * s
    ds = (cube[..., 2, 1, 1] - cube[..., 0, 1, 1]) * 0.5 * s
    dxx = (cube[..., 1, 1, 2] + cube[..., 1, 1, 0] - 2 * v) * s
    dyy = (cube[..., 1, 2, 1] + cube[..., 1, 0, 1] - 2 * v) * s
    dss = (cube[..., 2, 1, 1] + cube[..., 0, 1, 1] - 2 * v) * s
    dxy = (cube[..., 1, 2, 2] - cube[..., 1, 2, 0] - cube[..., 1, 0, 2] + cube[..., 1, 0, 0]) * 0.25 * s
    dxs = (cube[..., 2, 1, 2] - cube[..., 2, 1, 0] - cube[..., 0, 1, 2] + cube[..., 0, 1, 0]) * 0.25 * s
    dys = (cube[..., 2, 2, 1] - cube[..., 2, 0, 1] - cube[..., 0, 2, 1] + cube[..., 0, 0, 1]) * 0.25 * s
    grad = torch.stack([dx, dy, ds], -1)
    hess = torch.stack(
        [torch.stack([dxx, dxy, dxs], -1), torch.stack([dxy, dyy, dys], -1), torch.stack([dxs, dys, dss], -1)], -2
    )
    return grad, hess


def _max3x3_interior(x: Tensor, op) -> Tensor:
    """``op``-reduce (max or min) over 3x3 neighbourhoods of ``(..., h, w)`` for the samples at least ``_BORDER``
    pixels from the edge: ``(..., h - 2 B, w - 2 B)``. Separable shifted reductions on slices, no padding."""
    h, w = x.shape[-2:]
    b = _BORDER
    rows = x[..., b - 1 : h - b + 1, :]
    m = op(op(rows[..., b - 1 : w - b - 1], rows[..., b : w - b]), rows[..., b + 1 : w - b + 1])
    return op(op(m[..., :-2, :], m[..., 1:-1, :]), m[..., 2:, :])


# Share of an octave's candidates that each Newton step can still work on. Steps are cheap, but five of them over
# every candidate slot took up to ~30 % of the detector's time; a candidate that has not converged after step 1 (2) is
# rare: measured per image at most 28 % (16 %) of the slots on photos at 64-224 px and Fashion-MNIST at 64 px
# (bench/sift.py images), so later steps run on the strongest half (quarter) of the slots only. A candidate that
# would need a later step but is not among them is rejected, like one that never converges.
_STEP_BUDGET = (1.0, 0.5, 0.25, 0.25, 0.25)
assert len(_STEP_BUDGET) == _MAX_INTERP_STEPS


def _refine(dog_flat: Tensor, layer: Tensor, r: Tensor, c: Tensor, active: Tensor, h: int, w: int,
            n_layers: int) -> tuple[Tensor, ...]:
    """Quadratic sub-pixel/sub-scale refinement of ``(B, K)`` candidates (sorted strongest first), OpenCV's
    ``adjustLocalExtrema`` up to its contrast and edge tests.

    Returns ``off (B, K, 3)`` (dx, dy, ds), ``grad (B, K, 3)``, ``center (B, K)`` (DoG at the final sample),
    ``hess2 (B, K, 3)`` (dxx, dyy, dxy there), ``converged (B, K)`` and the final ``layer, r, c``.
    """
    b, k = layer.shape
    dev, dt = dog_flat.device, dog_flat.dtype
    # per slot: floats (off 3, grad 3, center 1, hess2 3), ints (c, r, layer), flags (active, converged)
    fstate = torch.zeros(b, k, 10, device=dev, dtype=dt)
    istate = torch.stack([c, r, layer], -1)
    flags = torch.stack([active, torch.zeros_like(active)], -1)
    full: tuple[Tensor, ...] = ()  # every slot's state, kept once the steps work on a subset
    ids: Tensor | None = None  # slots the steps work on (None: all)
    for frac in _STEP_BUDGET:
        kk = max(1, min(k, math.ceil(frac * k)))
        if kk < fstate.shape[1]:  # keep the strongest kk slots that are still active
            if ids is None:
                full = (fstate, istate, flags)  # every slot's state so far
            else:
                _scatter_state(full, ids, (fstate, istate, flags))
            rank = torch.arange(fstate.shape[1], 0, -1, device=dev)  # earlier slots are stronger
            _, sel = torch.where(flags[..., 0], rank, 0).topk(kk, dim=1)
            ids = sel if ids is None else ids.gather(1, sel)
            fstate, istate, flags = (t.gather(1, sel.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
                                     for t in (fstate, istate, flags))
        c, r, layer = istate.unbind(-1)
        active, converged = flags.unbind(-1)
        cube = _gather_cube(dog_flat, layer, r, c, h, w)
        g, hs = _derivatives(cube)
        x = -_solve3(hs, g)[0]
        small = (x.abs() < 0.5).all(-1)
        now = active & small
        new = torch.cat([x, g, cube[..., 1, 1, 1, None], hs[..., 0, 0, None], hs[..., 1, 1, None],
                         hs[..., 0, 1, None]], -1)
        fstate = torch.where(now.unsqueeze(-1), new, fstate)
        converged = converged | now
        # OpenCV rejects numerically exploding offsets before moving
        active = active & ~small & (x.abs() < 1e9).all(-1)
        step = torch.where(active.unsqueeze(-1), torch.round(x), torch.zeros_like(x)).long()
        istate = istate + step
        c, r, layer = istate.unbind(-1)
        inside = (layer >= 1) & (layer <= n_layers) & (c >= _BORDER) & (c < w - _BORDER)
        active = active & inside & (r >= _BORDER) & (r < h - _BORDER)
        flags = torch.stack([active, converged], -1)
    if ids is not None:
        _scatter_state(full, ids, (fstate, istate, flags))
        fstate, istate, flags = full
    off, grad, center, hess2 = fstate.split([3, 3, 1, 3], -1)
    c, r, layer = istate.unbind(-1)
    return off, grad, center.squeeze(-1), hess2, flags[..., 1], layer, r, c


def _scatter_state(full: tuple[Tensor, ...], ids: Tensor, part: tuple[Tensor, ...]) -> None:
    """Write the state of the slots ``ids (B, k)`` back into the full ``(B, K, ...)`` state, in place."""
    for t, p in zip(full, part):
        t.scatter_(1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]), p)


def _octave_keypoints(
    dog: Tensor, octave: int, n_layers: int, threshold: float, contrast_threshold: float, edge_threshold: float,
    sigma: float, coord_scale: float, max_candidates: int, refine: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keypoints of one octave. dog: ``(B, n_layers + 2, h, w)`` in grey levels (0..255).

    Returns xy (B, K, 2), scale (B, K), response (B, K), valid (B, K), K = min(max_candidates, candidates).
    """
    b, n_dog, h, w = dog.shape
    # 3x3x3 extrema: a sample is an extremum iff it equals the max (min) of its 27-neighbourhood. Max over the
    # layer below/itself/above first, then 3x3 spatial shifts computed only for the interior (no padding needed)
    mid = dog[:, 1 : n_layers + 1, _BORDER : h - _BORDER, _BORDER : w - _BORDER]  # (B, L, ih, iw)
    mx = _max3x3_interior(torch.maximum(torch.maximum(dog[:, :-2], dog[:, 1:-1]), dog[:, 2:]), torch.maximum)
    mn = _max3x3_interior(torch.minimum(torch.minimum(dog[:, :-2], dog[:, 1:-1]), dog[:, 2:]), torch.minimum)
    ext = ((mid > threshold) & (mid >= mx)) | ((mid < -threshold) & (mid <= mn))
    score = torch.where(ext, mid.abs(), -1.0)
    ih, iw = h - 2 * _BORDER, w - 2 * _BORDER
    k = min(max_candidates, score[0].numel())
    top, idx = score.flatten(1).topk(k, dim=1)  # strongest candidates when there are more than k
    valid = top > 0
    layer = idx // (ih * iw) + 1
    r = (idx // iw) % ih + _BORDER
    c = idx % iw + _BORDER

    dog_flat = dog.flatten(1)
    if refine:
        off, grad, center, hess2, converged, layer, r, c = _refine(dog_flat, layer, r, c, valid, h, w, n_layers)
        valid = converged  # never-converged candidates are rejected, as in OpenCV
        contr = center / 255.0 + 0.5 * (grad * off).sum(-1)
        dxx, dyy, dxy = hess2.unbind(-1)
        tr = dxx + dyy
        det = dxx * dyy - dxy * dxy
        valid &= contr.abs() * n_layers >= contrast_threshold
        valid &= (det > 0) & (tr * tr * edge_threshold < (edge_threshold + 1) ** 2 * det)
    else:
        off = torch.zeros(b, k, 3, device=dog.device, dtype=dog.dtype)
        contr = dog_flat.gather(1, (layer * h + r) * w + c) / 255.0
        valid &= contr.abs() * n_layers >= contrast_threshold

    # refinement may bring two candidates to the same sample: keep one (OpenCV's removeDuplicated)
    key = torch.where(valid, (layer * h + r) * w + c, -1 - torch.arange(k, device=dog.device))
    sorted_key, order = key.sort(dim=1)
    dup_sorted = torch.zeros_like(valid)
    dup_sorted[:, 1:] = sorted_key[:, 1:] == sorted_key[:, :-1]
    dup = torch.zeros_like(valid).scatter(1, order, dup_sorted)
    valid &= ~dup

    octave_size = coord_scale * 2.0**octave
    xy = torch.stack([c + off[..., 0], r + off[..., 1]], -1) * octave_size
    scale = sigma * torch.pow(2.0, (layer + off[..., 2]) / n_layers) * octave_size
    return xy, scale, contr.abs(), valid


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
    if max_keypoints < 1:
        raise ValueError(f"max_keypoints must be >= 1, got {max_keypoints}")
    if not candidate_density > 0 or (max_candidates is not None and max_candidates < 1):
        raise ValueError(f"candidate_density must be > 0 and max_candidates >= 1 (or None), got "
                         f"{candidate_density} and {max_candidates}")
    device_type = images.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        # work in grey levels 0..255 so OpenCV's integer pre-threshold applies unchanged
        gray = rgb_to_gray(images.float()) * 255.0
        b, _, h, w = gray.shape
        if upsample:
            gray = F.interpolate(gray, scale_factor=2.0, mode="bilinear", align_corners=False)
            init = _INIT_SIGMA * 2
        else:
            init = _INIT_SIGMA
        base = gaussian_blur(gray, math.sqrt(max(sigma**2 - init**2, 0.01)))
        n_octaves = int(round(math.log2(min(base.shape[-2:])) - 2)) + (1 if upsample else 0)
        coord_scale = 0.5 if upsample else 1.0
        threshold = math.floor(0.5 * contrast_threshold / n_octave_layers * 255)
        sig = _layer_sigmas(sigma, n_octave_layers)

        outs = []
        g = base
        gauss: list[Tensor] = []
        for o in range(max(n_octaves, 1)):
            if o > 0:  # next octave: layer n_octave_layers of the previous one, every second pixel
                g = gauss[n_octave_layers][..., ::2, ::2]
            if min(g.shape[-2:]) <= 2 * _BORDER:
                break  # no sample left away from the border, nor in any smaller octave
            gauss = [g]
            for i in range(1, n_octave_layers + 3):
                gauss.append(gaussian_blur(gauss[-1], sig[i]))
            stack = torch.cat(gauss, dim=1)  # (B, L + 3, h, w)
            dog = stack[:, 1:] - stack[:, :-1]  # (B, L + 2, h, w)
            area = (g.shape[-2] - 2 * _BORDER) * (g.shape[-1] - 2 * _BORDER)
            k = max(_MIN_CANDIDATES, math.ceil(candidate_density * area))
            xy, scl, resp, val = _octave_keypoints(
                dog, o, n_octave_layers, threshold, contrast_threshold, edge_threshold, sigma, coord_scale,
                min(k, max_candidates or k), refine,
            )
            outs.append((xy, scl, resp, val, torch.full_like(val, o, dtype=torch.long)))
        if not outs:
            raise ValueError(
                f"images of size {h}x{w} are too small for SIFT: need more than {2 * _BORDER} pixels per side "
                f"(after the optional 2x up-sampling)"
            )
        xy, scl, resp, val, octv = (torch.cat(t, dim=1) for t in zip(*outs))
        n = min(max_keypoints, val.shape[1])
        key = torch.where(val, resp, -1.0)
        _, idx = key.topk(n, dim=1)
        xy = xy.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
        out = Keypoints(xy, scl.gather(1, idx), resp.gather(1, idx), val.gather(1, idx), octv.gather(1, idx))
        if n < max_keypoints:  # pad to the fixed size
            p = max_keypoints - n
            out = Keypoints(
                F.pad(out.xy, (0, 0, 0, p)), F.pad(out.scale, (0, p)), F.pad(out.response, (0, p)),
                F.pad(out.valid, (0, p)), F.pad(out.octave, (0, p)),
            )
        return out


@functools.lru_cache(maxsize=1)
def compiled_detect_keypoints():
    """:func:`detect_keypoints` compiled with ``torch.compile`` (created once, shared), for static shapes.

    Same keypoints (tested), fused elementwise passes: see ``python bench/sift.py --compile`` for its speed.
    Compiling takes minutes on a small CPU, once per process and input shape (inductor's on-disk cache makes later
    processes faster), so it pays off in long runs at a fixed image and batch size (training drops the last
    incomplete batch), not in short tests. Each new shape compiles its own graph: static-shape code is faster
    than the dynamic-shape graph torch would otherwise build on the second shape.
    """
    # dynamo traces through the lru_cache'd helpers (blur matrices, offsets) and warns that it ignores the cache;
    # they are pure functions of their arguments, so tracing them is exact: silence that one warning
    warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function")
    return torch.compile(detect_keypoints, dynamic=False)


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
