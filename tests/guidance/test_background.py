"""siftguide.guidance.background: only keypoint-free patches are penalised."""
import torch

from siftguide.guidance import BackgroundSuppression
from tests.helpers import corner_relevance


def test_background_penalises_only_keypoint_free_patches(tiny_vit):
    net = tiny_vit()
    mode = BackgroundSuppression(net, layers=[-1])
    with mode.capture():
        net(torch.rand(2, 1, 32, 32))
    a = mode.patch_attention("cls")[1].detach()
    value = mode.value(corner_relevance(2))
    torch.testing.assert_close(value, 1 - a[:, [0, 1, 4, 5]].sum(1).mean())
    assert mode.value(torch.full((2, 4, 4), 1 / 16)) == 0  # no keypoint-free patch
    loss = mode.loss(corner_relevance(2), step=0)
    loss.backward()
    assert net.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
