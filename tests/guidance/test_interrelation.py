"""siftguide.guidance.interrelation: the patch-to-patch target and its gradients."""
import torch

from siftguide.guidance import PatchInterrelation, interrelation_target
from tests.helpers import corner_relevance


def test_interrelation_target_and_gradients(tiny_vit):
    rel = corner_relevance(2)
    t = interrelation_target(rel, (4, 4), sigma=1.0)
    torch.testing.assert_close(t.sum(-1), torch.ones(2, 16))
    assert t[:, :, [0, 1, 4, 5]].sum(-1).min() > 0.99  # every query looks at the relevant corner
    uni = interrelation_target(torch.full((1, 4, 4), 1 / 16), (4, 4), sigma=1.0)
    assert uni[0, 0, 1] > uni[0, 0, 15]  # uniform relevance: the locality kernel alone
    net = tiny_vit()
    mode = PatchInterrelation(net, layers=[0], sigma=1.0)
    with mode.capture():
        net(torch.rand(2, 1, 32, 32))
    loss = mode.loss(rel, step=0)
    loss.backward()
    assert loss > 0 and net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert net.blocks[1].attn.qkv.weight.grad is None or net.blocks[1].attn.qkv.weight.grad.abs().sum() == 0
