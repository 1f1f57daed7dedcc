"""siftguide.guidance.masking: keypoint-guided MAE masking hides the relevant patches, in training only."""
import pytest
import torch

from siftguide.guidance import KeypointMasking, guided_masking
from siftguide.objectives import Guided, MAEObjective
from siftguide.relevance import RelevanceStage
from tests.conftest import blob_image
from tests.helpers import corner_relevance


def test_keypoint_masking_hides_relevant_patches_more_than_random():
    torch.manual_seed(0)
    img = blob_image(64, center=(12.0, 12.0), sigma=3.0, batch=64)  # keypoints in the top-left patches
    rel = RelevanceStage("sift")(img, 16)[0]  # (64, 4, 4)
    rich = rel.flatten(1) > 0
    assert rich.any(1).all() and (~rich).any(1).all()
    _, guided = guided_masking(rel, n_keep=4, alpha=3.0, hint=0.0)
    _, rand = guided_masking(rel, n_keep=4, alpha=0.0, hint=0.0)
    hidden = lambda m: (m.bool() & rich).sum() / rich.sum()  # noqa: E731
    assert hidden(guided) > 0.95 and hidden(rand) < 0.9, (hidden(guided), hidden(rand))
    assert (guided.sum(1) == 12).all() and (rand.sum(1) == 12).all()
    # hints reveal some of the relevant patches, the masked count stays the same
    _, hinted = guided_masking(rel, n_keep=4, alpha=3.0, hint=0.5)
    assert hidden(hinted) < hidden(guided) and (hinted.sum(1) == 12).all()
    m = KeypointMasking(alpha=2.0, curriculum_steps=100)
    assert m.current_alpha(25) == pytest.approx(0.5) and m.current_alpha(200) == pytest.approx(2.0)


def test_masking_is_used_by_mae_in_training_only(tiny_vit):
    net = tiny_vit()
    obj = MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    obj.setup(net)
    mode = KeypointMasking(alpha=50.0, hint=0.0)
    mode.check(obj)
    rel = corner_relevance(2)
    chosen = mode.select_tokens(rel, 0, obj.visible_count(16))
    ids = obj(net, torch.rand(2, 1, 32, 32), {}, "train", Guided(chosen)).ids_keep
    assert torch.equal(ids, chosen) and ids.shape == (2, 4)
    assert not (ids.unsqueeze(-1) == torch.tensor([0, 1, 4, 5])).any()  # relevant patches all masked
    torch.manual_seed(0)
    val = obj(net, torch.rand(2, 1, 32, 32), {}, "val", Guided(chosen)).ids_keep
    assert val.shape == ids.shape and not torch.equal(val, chosen)  # random masks at validation
    with pytest.raises(ValueError, match="says how many"):
        mode.select_tokens(rel, 0, None)
