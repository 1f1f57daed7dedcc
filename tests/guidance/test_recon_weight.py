"""siftguide.guidance.recon_weight: KAMIM's keypoint weights; uniform relevance leaves MAE unchanged."""
import pytest
import torch

from siftguide.guidance import KeypointReconWeight, keypoint_weights
from siftguide.objectives import Guided, MAEObjective, weighted_patch_loss
from tests.helpers import corner_relevance


def test_keypoint_weights_follow_kamim():
    rel = corner_relevance(1, rich=(0,))
    w = keypoint_weights(rel, temperature=0.25)
    assert w.min() == 1.0 and w[0, 0] == pytest.approx(torch.e**4)
    uni = keypoint_weights(torch.full((2, 4, 4), 1 / 16))
    assert torch.equal(uni, torch.ones(2, 16))
    per_patch, mask = torch.rand(2, 16), (torch.rand(2, 16) > 0.5).float()
    assert torch.equal(weighted_patch_loss(per_patch, mask, uni), weighted_patch_loss(per_patch, mask))
    assert weighted_patch_loss(per_patch, mask, uni, "weight") == pytest.approx(float(weighted_patch_loss(per_patch, mask)))


def test_mae_without_relevance_consumers_is_unchanged(tiny_vit):
    x = torch.rand(2, 1, 32, 32)
    outs = []
    uniform = torch.full((2, 4, 4), 1 / 16)
    for weighting in (None, KeypointReconWeight()):
        net = tiny_vit()
        obj = MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
        obj.setup(net)
        guided = Guided() if weighting is None else Guided(None, *weighting.patch_weights(uniform, 0))
        torch.manual_seed(1)
        # uniform relevance: KAMIM weights are all 1, the loss is plain MAE's
        outs.append(obj(net, x, {}, "train", guided).loss)
    assert torch.equal(outs[0], outs[1])
