"""SIFT keypoints -> per-patch relevance distributions over a ViT's patch grid.

Each relevance map is ``(B, Gh, Gw)``, non-negative, and sums to 1 per image. Three ways to turn keypoints
into mass (``mode``), and one dense alternative without keypoints:

* ``count``: number of keypoints whose location falls in the patch;
* ``response``: sum of the keypoints' DoG contrast (strong, well-localised keypoints count more);
* ``gaussian``: each keypoint spreads a unit of mass as an isotropic Gaussian of std ``splat * scale``
  (its SIFT scale, in pixels) integrated over the patches (a keypoint describes a region, not a point);
* ``dog``: the mean absolute difference of Gaussians over the patch, summed over the first octave's scale layers
  (:func:`dog_relevance`, from the image itself): every structure at SIFT's scales leaves mass, also where it is
  too small or too faint to give an extremum that passes the detector's tests.

Then ``m -> m ** (1 / temperature)`` (T > 1 flattens, T < 1 sharpens), an optional Gaussian smoothing over the
patch grid (``smoothing`` in patches), normalisation, and mixing with the uniform distribution
``(1 - uniform_mix) * r + uniform_mix / P``. Images without any keypoint get the uniform distribution.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..precision import fp32_region
from .detector import Keypoints, check_images, detect_keypoints, gaussian_blur, rgb_to_gray

__all__ = ["MODES", "KEYPOINT_MODES", "PRIOR_FORMS", "dog_relevance", "counts_from_keypoints", "keypoint_patch_counts", "patch_relevance",
           "relevance_from_keypoints", "normalize_relevance", "compose_with_prior", "shuffle_relevance", "shuffle_shift",
           "uniform_relevance", "gradient_relevance", "roll_relevance", "random_relevance", "foreground_relevance",
           "patch_positions"]

MODES = ("count", "response", "gaussian", "dog")
KEYPOINT_MODES = ("count", "response", "gaussian")  # the modes computed from keypoints (cached or detected)
_DOG_FLOOR = 1e-4  # |DoG| below this is float rounding (one grey level gives ~1e-3)
PRIOR_FORMS = ("mixture", "product")


def _pair(p: int | tuple[int, int]) -> tuple[int, int]:
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


def patch_positions(grid: tuple[int, int], device=None) -> Tensor:
    """``(P, 2)`` row/column of every patch of a ``(Gh, Gw)`` grid, in timm's row-major token order."""
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=1).float()


def counts_from_keypoints(kp: Keypoints, grid: tuple[int, int], patch_size: int | tuple[int, int],
                          weights: Tensor | None = None) -> Tensor:
    """``(B, Gh, Gw)`` number of valid keypoints whose location falls in each patch (or the sum of their
    ``weights`` ``(B, N)``).

    A keypoint at ``(x, y)`` (pixel centres at integers) belongs to patch ``floor((y + 0.5) / ph),
    floor((x + 0.5) / pw)``, clamped to the grid.
    """
    gh, gw = grid
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    px = ((kp.xy[..., 0] + 0.5) / pw).floor().long().clamp(0, gw - 1)
    py = ((kp.xy[..., 1] + 0.5) / ph).floor().long().clamp(0, gh - 1)
    flat = py * gw + px
    counts = torch.zeros(kp.valid.shape[0], gh * gw, device=kp.valid.device, dtype=torch.float32)
    w = kp.valid.float() if weights is None else kp.valid.float() * weights.float()
    counts.scatter_add_(1, flat, w)
    return counts.view(-1, gh, gw)


def keypoint_patch_counts(images: Tensor, patch_size: int = 16, **detector_kwargs) -> Tensor:
    """``(B, H // patch_size, W // patch_size)`` valid SIFT keypoints per patch of each image."""
    check_images(images)
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={patch_size}")
    kp = detect_keypoints(images, **detector_kwargs)
    return counts_from_keypoints(kp, (h // patch_size, w // patch_size), patch_size)


def _splat(kp: Keypoints, grid: tuple[int, int], patch: tuple[int, int], width: float) -> Tensor:
    """Mass of each keypoint's Gaussian (std ``width * scale``) falling in each patch: ``(B, Gh, Gw)``.

    Separable: the integral over a rectangle is the product of 1-D integrals, computed with ``erf``.
    """
    gh, gw = grid
    ph, pw = patch
    std = (kp.scale * width).clamp_min(0.5).unsqueeze(-1) * math.sqrt(2.0)  # (B, N, 1)

    def axis_mass(coord: Tensor, n: int, p: int) -> Tensor:
        edges = torch.arange(n + 1, device=coord.device, dtype=coord.dtype) * p - 0.5  # pixel-edge coordinates
        cdf = torch.erf((edges - coord.unsqueeze(-1)) / std)  # (B, N, n + 1)
        return 0.5 * (cdf[..., 1:] - cdf[..., :-1])  # (B, N, n)

    mx = axis_mass(kp.xy[..., 0], gw, pw)
    my = axis_mass(kp.xy[..., 1], gh, ph)
    w = kp.valid.to(mx.dtype)
    return torch.einsum("bn,bnh,bnw->bhw", w, my, mx)


def normalize_relevance(mass: Tensor, temperature: float = 1.0, smoothing: float = 0.0,
                        uniform_mix: float = 0.0) -> Tensor:
    """``(B, Gh, Gw)`` non-negative mass -> distribution (see module docstring); uniform where mass is all 0."""
    if mass.ndim != 3:
        raise ValueError(f"mass must have shape (B, Gh, Gw), got {tuple(mass.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
    m = mass.float().clamp_min(0)
    if temperature != 1.0:
        m = m.pow(1.0 / temperature)
    if smoothing > 0:
        m = gaussian_blur(m.unsqueeze(1), smoothing).squeeze(1).clamp_min(0)
    b, gh, gw = m.shape
    total = m.flatten(1).sum(1).view(b, 1, 1)
    uniform = torch.full_like(m, 1.0 / (gh * gw))
    rel = torch.where(total > 0, m / total.clamp_min(1e-12), uniform)
    if uniform_mix > 0:
        rel = (1 - uniform_mix) * rel + uniform_mix * uniform
    return rel


@fp32_region()  # maps in fp32 under autocast (bf16 einsum / blur would break the normalisation)
def relevance_from_keypoints(
    kp: Keypoints, grid: tuple[int, int], patch_size: int | tuple[int, int], mode: str = "count",
    temperature: float = 1.0, smoothing: float = 0.0, uniform_mix: float = 0.0, splat: float = 1.0,
) -> Tensor:
    """``(B, Gh, Gw)`` relevance from keypoints on a ``grid`` of ``patch_size`` patches."""
    patch = _pair(patch_size)
    if mode == "count":
        mass = counts_from_keypoints(kp, grid, patch)
    elif mode == "response":
        mass = counts_from_keypoints(kp, grid, patch, weights=kp.response)
    elif mode == "gaussian":
        mass = _splat(kp, grid, patch, splat)
    else:
        raise ValueError(f"relevance mode {mode!r} is not computed from keypoints; expected one of {KEYPOINT_MODES}")
    return normalize_relevance(mass, temperature, smoothing, uniform_mix)


@fp32_region()
def dog_relevance(images: Tensor, patch_size: int | tuple[int, int], sigma: float = 1.6, layers: int = 3,
                  temperature: float = 1.0, smoothing: float = 0.0, uniform_mix: float = 0.0) -> Tensor:
    """Dense SIFT-scale structure per patch: ``(B, C, H, W)`` in [0, 1] -> ``(B, H // ph, W // pw)``.

    With ``G_i`` the grey image blurred at ``sigma * 2^(i / layers)`` (SIFT's first-octave scales, at the image's
    resolution), the mass of a patch is the mean over its pixels of ``sum_{i < layers + 2} |G_{i+1} - G_i|`` (sums below
    1e-4, float rounding, count as 0), then :func:`normalize_relevance` (uniform for a constant image).
    """
    check_images(images)
    ph, pw = _pair(patch_size)
    h, w = images.shape[-2:]
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {(ph, pw)}")
    if sigma <= 0 or layers < 1:
        raise ValueError(f"dog_relevance needs sigma > 0 and layers >= 1, got {sigma} and {layers}")
    g = rgb_to_gray(images.float())
    blurred = [gaussian_blur(g, sigma * 2 ** (i / layers)) for i in range(layers + 3)]
    energy = sum((b - a).abs() for a, b in zip(blurred[:-1], blurred[1:]))  # (B, 1, H, W)
    energy = torch.where(energy > _DOG_FLOOR, energy, 0.0)  # rounding of the blur on flat regions is no structure
    mass = torch.nn.functional.avg_pool2d(energy, (ph, pw)).squeeze(1)
    return normalize_relevance(mass, temperature, smoothing, uniform_mix)


def patch_relevance(
    images: Tensor, patch_size: int | tuple[int, int] = 16, mode: str = "count", temperature: float = 1.0,
    smoothing: float = 0.0, uniform_mix: float = 0.0, splat: float = 1.0, **detector_kwargs,
) -> Tensor:
    """SIFT patch relevance of a batch: ``(B, C, H, W)`` in ``[0, 1]`` -> ``(B, H // ph, W // pw)``, each map
    summing to 1 (uniform for images without keypoints); ``mode="dog"``: the dense map of :func:`dog_relevance`.

    Example:
        >>> img = torch.zeros(1, 1, 64, 64); img[:, :, 8:16, 40:48] = 1.0
        >>> rel = patch_relevance(img, patch_size=16)
        >>> rel.shape, round(float(rel.sum()), 4), int(rel.flatten().argmax())
        (torch.Size([1, 4, 4]), 1.0, 2)
    """
    check_images(images)
    ph, pw = _pair(patch_size)
    h, w = images.shape[-2:]
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {(ph, pw)}")
    if mode == "dog":  # dense: no keypoints
        return dog_relevance(images, (ph, pw), detector_kwargs.get("sigma", 1.6),
                             detector_kwargs.get("n_octave_layers", 3), temperature, smoothing, uniform_mix)
    kp = detect_keypoints(images, **detector_kwargs)
    return relevance_from_keypoints(kp, (h // ph, w // pw), (ph, pw), mode, temperature, smoothing, uniform_mix,
                                    splat)


# ----------------------------------------------------------------------------------------------------------------
# Control targets: same shape and normalisation, no SIFT information (or SIFT information from another image).
# ----------------------------------------------------------------------------------------------------------------
def uniform_relevance(rel: Tensor) -> Tensor:
    """Uniform distribution with the shape of ``rel`` ``(B, Gh, Gw)``."""
    return torch.full_like(rel, 1.0 / (rel.shape[-1] * rel.shape[-2]))


def shuffle_shift(batch: int, generator: torch.Generator | None = None) -> int:
    """A cyclic shift in ``1..batch - 1`` drawn from ``generator`` (use a CPU generator: the draw is read on the
    host), so that no image keeps its own map; 0 (and no draw) for ``batch < 2``."""
    return int(torch.randint(1, batch, (1,), generator=generator)) if batch >= 2 else 0


def shuffle_relevance(rel: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Relevance maps permuted across the images of the batch (a derangement when B > 1): keeps the marginal
    statistics of SIFT relevance but breaks its link with the image it is paired with."""
    return rel.roll(shuffle_shift(rel.shape[0], generator), dims=0)


@fp32_region()
def compose_with_prior(rel: Tensor, prior: Tensor, mix: float, count: Tensor | None = None,
                       min_keypoints: float = 0.0, form: str = "mixture") -> Tensor:
    """Each image's map composed with a dataset prior: ``(B, Gh, Gw)`` distributions.

    Per image ``b`` the prior's weight is ``l_b = 1 - (1 - mix) * e_b`` with the evidence ``e_b = min(1, count_b /
    min_keypoints)`` (``e_b = 1`` when ``min_keypoints == 0``), so an image without keypoints gets the prior itself.
    ``form="mixture"``: ``(1 - l) rel + l prior``; ``form="product"``: ``prior^l rel^(1 - l)``, renormalised (the
    prior where the two have no patch in common). ``mix = 0`` with ``min_keypoints = 0`` returns ``rel``.

    Args:
        rel: ``(B, Gh, Gw)`` per-image maps; prior: ``(1 or B, Gh, Gw)``; count: ``(B,)`` keypoints per image
            (needed when ``min_keypoints > 0``).
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"prior mix must be in [0, 1], got {mix}")
    if min_keypoints < 0:
        raise ValueError(f"min_keypoints must be >= 0, got {min_keypoints}")
    if form not in PRIOR_FORMS:
        raise ValueError(f"unknown prior form {form!r}; expected one of {PRIOR_FORMS}")
    if rel.ndim != 3 or prior.ndim != 3 or prior.shape[-2:] != rel.shape[-2:]:
        raise ValueError(f"rel must be (B, Gh, Gw) and prior (1 or B, Gh, Gw) on the same grid, got "
                         f"{tuple(rel.shape)} and {tuple(prior.shape)}")
    r, m = rel.float(), prior.float().to(rel.device)
    lam = torch.full((r.shape[0], 1, 1), float(mix), device=r.device)
    if min_keypoints > 0:
        if count is None or count.shape != (r.shape[0],):
            raise ValueError(f"min_keypoints needs count (B,) = ({r.shape[0]},) keypoints per image")
        evidence = (count.to(r.device).float() / float(min_keypoints)).clamp(max=1.0).view(-1, 1, 1)
        lam = 1.0 - (1.0 - lam) * evidence
    if form == "mixture":
        return (1.0 - lam) * r + lam * m
    out = m.pow(lam) * r.pow(1.0 - lam)  # 0^0 = 1: l = 1 gives the prior, l = 0 the image's map
    total = out.flatten(1).sum(1).view(-1, 1, 1)
    return torch.where(total > 0, out / total.clamp_min(1e-12), m.expand_as(out))


@fp32_region()
def gradient_relevance(images: Tensor, patch_size: int | tuple[int, int], temperature: float = 1.0,
                       smoothing: float = 0.0, uniform_mix: float = 0.0) -> Tensor:
    """Non-SIFT saliency control: per-patch mean Sobel gradient magnitude of the grey image ``(B, Gh, Gw)``."""
    import kornia

    check_images(images)
    ph, pw = _pair(patch_size)
    g = kornia.filters.spatial_gradient(rgb_to_gray(images.float()), mode="sobel")  # (B, 1, 2, H, W)
    mag = g.pow(2).sum(2).sqrt()  # no eps floor: flat regions get exactly no mass
    mass = torch.nn.functional.avg_pool2d(mag, (ph, pw)).squeeze(1)
    return normalize_relevance(mass, temperature, smoothing, uniform_mix)


def roll_relevance(rel: Tensor) -> Tensor:
    """Each image's own map shifted by half the grid along both axes (cyclically): the same values and
    statistics, in the wrong place."""
    gh, gw = rel.shape[-2:]
    return rel.roll((gh // 2, gw // 2), dims=(-2, -1))


def random_relevance(shape: tuple[int, int, int], device=None, generator: torch.Generator | None = None) -> Tensor:
    """Fresh i.i.d. uniform noise per patch, normalised per image ``(B, Gh, Gw)``: ranking patches by it is
    random token dropping / random masking."""
    noise = torch.rand(shape, device=device, generator=generator)
    return noise / noise.flatten(1).sum(1).view(-1, 1, 1)


@fp32_region()
def foreground_relevance(images: Tensor, patch_size: int | tuple[int, int], threshold: float = 0.1,
                         temperature: float = 1.0, smoothing: float = 0.0, uniform_mix: float = 0.0) -> Tensor:
    """Oracle control (not SIFT): share of foreground pixels per patch ``(B, Gh, Gw)``, normalised.

    A pixel is foreground when its grey value differs from the image's background level (the median of its
    border pixels) by more than ``threshold``. Exact for objects on a plain background (Fashion-MNIST and its
    generated variants); an upper bound on what a perfect saliency map could give, labelled as such.
    """
    check_images(images)
    ph, pw = _pair(patch_size)
    g = rgb_to_gray(images.float())  # (B, 1, H, W)
    border = torch.cat([g[..., 0, :], g[..., -1, :], g[..., :, 0], g[..., :, -1]], dim=-1)  # (B, 1, 2H + 2W)
    bg = border.median(dim=-1).values.view(-1, 1, 1, 1)
    fg = ((g - bg).abs() > threshold).float()
    mass = torch.nn.functional.avg_pool2d(fg, (ph, pw)).squeeze(1)
    return normalize_relevance(mass, temperature, smoothing, uniform_mix)
