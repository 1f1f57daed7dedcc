"""siftguide: SIFT-guided self-attention for Vision Transformer pre-training.

Public API (stable)::

    from siftguide import detect_keypoints, keypoint_patch_counts, patch_relevance, SiftGuidance
"""
from .guidance import GuidanceSchedule, SiftGuidance
from .relevance import patch_relevance, relevance_from_keypoints
from .sift import Keypoints, SIFTDetector, detect_keypoints, keypoint_patch_counts

__all__ = [
    "detect_keypoints", "keypoint_patch_counts", "patch_relevance", "relevance_from_keypoints", "SiftGuidance",
    "GuidanceSchedule", "Keypoints", "SIFTDetector",
]
__version__ = "0.1.0"
