"""siftguide: SIFT-guided Vision Transformer pre-training.

The public names, imported on first use (``import siftguide`` itself loads no torch, so the training entry point
can set up torch's threads before it starts)::

    from siftguide import detect_keypoints, keypoint_patch_counts, patch_relevance, RelevanceStage
    from siftguide.guidance import AttentionAlignment, AttentionPrior, TokenDrop, KeypointMasking
    from siftguide.objectives import SupervisedObjective, MAEObjective
"""
import importlib

__version__ = "0.1.0"
_PUBLIC = {
    "detect_keypoints": "siftguide.relevance", "keypoint_patch_counts": "siftguide.relevance",
    "patch_relevance": "siftguide.relevance", "relevance_from_keypoints": "siftguide.relevance",
    "RelevanceStage": "siftguide.relevance", "Keypoints": "siftguide.relevance", "SIFTDetector": "siftguide.relevance",
    "AttentionAlignment": "siftguide.guidance", "GuidanceSchedule": "siftguide.guidance",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'siftguide' has no attribute {name!r}")
