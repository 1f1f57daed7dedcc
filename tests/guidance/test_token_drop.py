"""siftguide.guidance.token_drop: the sequence is shortened to the most relevant patches; bad settings fail."""
import pytest
import torch

from siftguide.guidance import AttentionAlignment, TokenDrop, select_tokens
from siftguide.objectives import Guided, SupervisedObjective
from tests.helpers import corner_relevance


def test_token_drop_shortens_the_sequence_and_keeps_the_most_relevant(tiny_vit):
    net = tiny_vit()
    drop = TokenDrop(net, keep_ratio=0.25)
    rel = corner_relevance()
    ids = drop.select_tokens(rel, 0)
    assert ids.shape == (4, 4) and (ids == torch.tensor([0, 1, 4, 5])).all()
    obj = SupervisedObjective()
    obj.setup(net)
    guide = AttentionAlignment(net, layers=[0, 1])
    with guide.capture():
        out = obj(net, torch.rand(4, 1, 32, 32), {"label": torch.zeros(4, dtype=torch.long)}, "train", Guided(ids))
    assert all(m.shape[-1] == 1 + 4 for m in guide._capture.maps.values())  # CLS + 4 of 16 patches
    assert torch.equal(out.ids_keep, ids)
    assert torch.isfinite(guide.loss(rel, 0, ids_keep=ids))
    # a random share: 4 kept, 2 of them random, the 2 top ones always in
    ids = select_tokens(rel, 4, 2, torch.Generator().manual_seed(0))
    assert ids.shape == (4, 4) and all(len(set(r.tolist()) & {0, 1, 4, 5}) >= 2 for r in ids)
    # full sequence after full_after * total_steps
    late = TokenDrop(net, keep_ratio=0.5, full_after=0.5, total_steps=10)
    assert late.select_tokens(rel, 4) is not None and late.select_tokens(rel, 5) is None


@pytest.mark.parametrize("kw", [dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(random_share=-0.1), dict(full_after=0.5)])
def test_token_drop_rejects_bad_settings(kw, tiny_vit):
    with pytest.raises(ValueError):
        TokenDrop(tiny_vit(), **kw)
