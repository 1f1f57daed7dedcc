"""siftguide.guidance.masking: keypoint-guided MAE masking hides the relevant patches, in training only."""
import pytest
import torch

from siftguide.guidance import KeypointMasking, guided_masking
from siftguide.objectives import MAEObjective
from siftguide.relevance import RelevanceSource
from tests.conftest import blob_image
from tests.helpers import corner_relevance


def test_keypoint_masking_hides_relevant_patches_more_than_random():
    torch.manual_seed(0)
    img = blob_image(64, center=(12.0, 12.0), sigma=3.0, batch=64)  # keypoints in the top-left patches
    rel = RelevanceSource("sift")(img, 16)  # (64, 4, 4)
    rich = rel.flatten(1) > 0
    assert rich.any(1).all() and (~rich).any(1).all()
    _, guided = guided_masking(rel, keep=4, alpha=3.0, hint=0.0)
    _, rand = guided_masking(rel, keep=4, alpha=0.0, hint=0.0)
    hidden = lambda m: (m.bool() & rich).sum() / rich.sum()  # noqa: E731
    assert hidden(guided) > 0.95 and hidden(rand) < 0.9, (hidden(guided), hidden(rand))
    assert (guided.sum(1) == 12).all() and (rand.sum(1) == 12).all()
    # hints reveal some of the relevant patches, the masked count stays the same
    _, hinted = guided_masking(rel, keep=4, alpha=3.0, hint=0.5)
    assert hidden(hinted) < hidden(guided) and (hinted.sum(1) == 12).all()
    m = KeypointMasking(alpha=2.0, curriculum_steps=100)
    m.set_step(25)
    assert m.current_alpha() == pytest.approx(0.5)


def test_masking_is_used_by_mae_in_training_only(tiny_vit):
    net = tiny_vit()
    obj = MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    obj.setup(net)
    KeypointMasking(alpha=50.0, hint=0.0).bind(obj)
    rel = corner_relevance(2)
    batch = {"relevance": rel}
    ids = obj(net, torch.rand(2, 1, 32, 32), batch, "train").ids_keep
    assert not (ids.unsqueeze(-1) == torch.tensor([0, 1, 4, 5])).any()  # relevant patches all masked
    torch.manual_seed(0)
    val = obj(net, torch.rand(2, 1, 32, 32), batch, "val").ids_keep
    assert val.shape == ids.shape  # random masks at validation, whatever the relevance
