"""Mode ``attmask`` (iBOT): mask the patches the relevance map ranks highest (AttMask's rule on any map).

AttMask (Kakogeorgiou et al. 2022) masks, in each global view, the patches the teacher's class token attends to most.
This mode applies the same rule to the batch's relevance (:func:`~siftguide.guidance.patch_masks.relevance_patch_mask`),
so the map is the experiment: ``relevance.kind=sift`` (keypoint-dense patches, mapped into each view), and the
controls ``random`` (random masking), ``mean`` (the dataset-mean map), ``shuffled`` (another image's map). ``hints``
> 0 is AttMask-Hint: a share of the top patches is left visible and as many next-ranked ones are masked instead. The
number of masked patches per image is the objective's (``objective.mask_counts``: iBOT's ratio drawn per image, half
of the images unmasked). Without this mode, iBOT masks by its own ``mask_pattern`` (``block``, ``random``, or the
teacher's attention: AttMask itself). Draws from torch's global generator, as the objective's own masks do.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import GuidanceMode
from .patch_masks import relevance_patch_mask

__all__ = ["AttMask"]


class AttMask(GuidanceMode):
    """Args: model (unused, for a uniform constructor); hints (share of the masked top patches revealed, in [0, 1))."""

    acts_in = "objective"
    name = "attmask"
    masks_patches = True
    requires = "patch_masks"
    objective_hint = "it masks the student's patches of a masked-prediction objective (objective=ibot)"

    def __init__(self, model: nn.Module | None = None, hints: float = 0.0) -> None:
        if not 0.0 <= hints < 1.0:
            raise ValueError(f"attmask hints must be in [0, 1), got {hints}")
        self.hints = float(hints)

    def patch_mask(self, relevance: Tensor, step: int, counts: Tensor) -> Tensor:
        """``(B, P)`` bool: the ``counts[b]`` most relevant patches of each view (with AttMask-Hint's reveal)."""
        return relevance_patch_mask(relevance, counts, self.hints)

    def __repr__(self) -> str:
        return f"AttMask(hints={self.hints})"
