"""The relevance stage, in the order the data flows: keypoint detection (:mod:`.detector`), keypoints -> per-patch
relevance maps and the wrong-map controls (:mod:`.maps`), the keypoint caches (:mod:`.cache`), and the stage
that picks cache, on-the-fly detection or a control for every batch (:mod:`.stage`)."""
from .cache import KeypointCache, transform_keypoints
from .detector import Keypoints, SIFTDetector, compiled_detect_keypoints, detect_keypoints, gaussian_blur, rgb_to_gray
from .maps import (MODES, PRIOR_FORMS, compose_with_prior, counts_from_keypoints, dog_relevance, foreground_relevance,
                   gradient_relevance, keypoint_patch_counts, normalize_relevance, patch_positions, patch_relevance,
                   random_relevance, relevance_from_keypoints, roll_relevance, shuffle_relevance, uniform_relevance)
from .stage import KINDS, RelevanceStage

__all__ = [
    "Keypoints", "SIFTDetector", "detect_keypoints", "compiled_detect_keypoints", "gaussian_blur", "rgb_to_gray",
    "MODES", "PRIOR_FORMS", "compose_with_prior", "dog_relevance", "counts_from_keypoints", "keypoint_patch_counts", "patch_relevance", "relevance_from_keypoints",
    "normalize_relevance", "patch_positions", "uniform_relevance", "shuffle_relevance", "gradient_relevance",
    "roll_relevance", "random_relevance", "foreground_relevance", "KeypointCache", "transform_keypoints",
    "RelevanceStage", "KINDS",
]
