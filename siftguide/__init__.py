"""siftguide: SIFT-guided self-attention for Vision Transformer pre-training.

Public API (stable)::

    from siftguide import detect_keypoints, keypoint_patch_counts, patch_relevance, SiftGuidance
"""
from . import compat  # noqa: F401 - old import paths (siftguide.sift, .source, .cache, .guidance.alignment, ...)
from .guidance import GuidanceSchedule, SiftGuidance
from .relevance import (Keypoints, SIFTDetector, detect_keypoints, keypoint_patch_counts, patch_relevance,
                        relevance_from_keypoints)

__all__ = [
    "detect_keypoints", "keypoint_patch_counts", "patch_relevance", "relevance_from_keypoints", "SiftGuidance",
    "GuidanceSchedule", "Keypoints", "SIFTDetector",
]
__version__ = "0.1.0"
