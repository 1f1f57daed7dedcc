"""Old import paths keep working for users' scripts: the aliases of siftguide.compat and the compare shim."""
import pytest


def test_old_import_paths_still_work():
    """siftguide.sift / .source / .cache moved into siftguide.relevance; users' imports keep working."""
    import siftguide.relevance as rel
    from siftguide.cache import KeypointCache
    from siftguide.sift import counts_from_keypoints, detect_keypoints, keypoint_patch_counts
    from siftguide.source import RelevanceSource, RelevanceTarget

    assert detect_keypoints is rel.detect_keypoints and counts_from_keypoints is rel.counts_from_keypoints
    assert keypoint_patch_counts is rel.keypoint_patch_counts and KeypointCache is rel.KeypointCache
    assert RelevanceSource is rel.RelevanceStage and RelevanceTarget is rel.RelevanceStage


def test_old_import_path_is_a_shim():
    import siftguide.analysis.compare as new
    import siftguide.compare as old

    assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)
    assert old.IGNORED_PREFIXES is new.IGNORED_PREFIXES
    assert old.__all__ == ["main"]  # the shim exports only its entry point
    from siftguide.compare import summarize  # older scripts' imports still resolve, through the new modules

    assert summarize is new.summarize
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        old.nope  # noqa: B018
