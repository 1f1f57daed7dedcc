"""siftguide.guidance.token_drop: the sequence is shortened to the most relevant patches; bad settings fail."""
import pytest
import torch

from siftguide.guidance import AttentionAlignment, TokenDrop, select_tokens
from siftguide.guidance.token_drop import allocate_budget, budget_weights
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


# ------------------------------------------------------------------------------------------ per-image budget
@pytest.mark.parametrize("seed", range(5))
def test_allocate_budget_spends_exactly_the_mean_within_bounds_and_grows_with_weight(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(16, generator=g) ** 3 * 10
    counts = allocate_budget(w, n_mean=8, n_min=4, n_max=12)
    assert counts.dtype == torch.long and counts.sum() == 16 * 8
    assert counts.min() >= 4 and counts.max() <= 12
    order = w.argsort()
    assert (counts[order].diff() >= -1).all()  # monotone up to the rounding of one token
    assert counts[w.argmax()] >= counts[w.argmin()] + 2


def test_allocate_budget_equal_weights_and_edges():
    assert torch.equal(allocate_budget(torch.ones(6), 5, 2, 9), torch.full((6,), 5))
    assert torch.equal(allocate_budget(torch.zeros(6), 5, 2, 9), torch.full((6,), 5))
    # one image with all the weight is capped, the others share the rest evenly
    counts = allocate_budget(torch.tensor([100.0, 1.0, 1.0, 1.0]), 4, 2, 6)
    assert counts.tolist()[0] == 6 and counts.sum() == 16 and sorted(counts.tolist()[1:]) == [3, 3, 4]
    with pytest.raises(ValueError, match="n_min <= n_mean <= n_max"):
        allocate_budget(torch.ones(3), 5, 6, 9)


def test_budget_weights_entropy_and_spread():
    rel = torch.zeros(3, 4, 4)
    rel[0, 1, 1] = 1.0  # one patch
    rel[1, 0, 0] = rel[1, 3, 3] = 1.0  # two far-apart patches
    rel[2] = 1.0  # uniform
    ent = budget_weights(rel, "entropy")
    assert torch.allclose(ent, torch.tensor([1.0, 2.0, 16.0]), atol=1e-4)
    spread = budget_weights(rel, "spread")
    assert spread[0] == 0 and spread[1] > spread[2] > 0
    with pytest.raises(ValueError, match="budget must be one of"):
        budget_weights(rel, "area")


def test_per_image_budget_runs_a_static_sequence_and_keeps_the_top_ranked(tiny_vit):
    net = tiny_vit()
    drop = TokenDrop(net, keep_ratio=0.25, budget="entropy", budget_range=(0.5, 2.0))
    assert (drop.n_keep, drop.n_min, drop.n_run) == (4, 2, 8)
    rel = torch.full((4, 4, 4), 1e-3)
    rel[0, 0, 0] = 1.0  # concentrated: few tokens
    rel[1] = torch.rand(4, 4)  # spread: many
    rel[2, :2, :2] = 1.0
    rel[3, 2:, 2:] = torch.tensor([[1.0, 0.5], [0.25, 0.125]])
    ids, counts = drop.select_tokens(rel, 0), drop.keep_counts(rel, 0)
    assert ids.shape == (4, 8) and counts.sum() == 16 and counts[1] > counts[0]
    flat = rel.flatten(1)
    for i in range(4):  # the first counts[i] are that image's most relevant patches, in rank order
        assert torch.equal(flat[i, ids[i]], flat[i, ids[i]].sort(descending=True).values)
    assert TokenDrop(net, keep_ratio=0.25).keep_counts(rel, 0) is None  # fixed budget: all selected kept


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_padding_is_masked_out_exactly(pool, tiny_vit):
    """Each image's logits with its padded row equal those of the same model run on only its kept tokens."""
    torch.manual_seed(0)
    net = tiny_vit(global_pool=pool, class_token=pool == "token").eval()
    obj = SupervisedObjective()
    obj.setup(net)
    images, labels = torch.rand(3, 1, 32, 32), torch.zeros(3, dtype=torch.long)
    ids = torch.stack([torch.randperm(16)[:8] for _ in range(3)])
    counts = torch.tensor([2, 5, 8])
    padded = obj(net, images, {"label": labels}, "train", Guided(ids, keep_counts=counts))
    for i, k in enumerate(counts.tolist()):
        alone = obj(net, images[i:i + 1], {"label": labels[i:i + 1]}, "train", Guided(ids[i:i + 1, :k]))
        assert torch.allclose(padded.logits[i], alone.logits[0], atol=1e-5)
    unmasked = obj(net, images, {"label": labels}, "train", Guided(ids))
    assert not torch.allclose(padded.logits[0], unmasked.logits[0], atol=1e-3)  # the mask does something


def test_per_image_budget_refuses_other_pooling_and_bad_settings(tiny_vit):
    net = tiny_vit(global_pool="max", class_token=False)
    obj = SupervisedObjective()
    obj.setup(net)
    with pytest.raises(ValueError, match="global_pool 'token' or 'avg'"):
        obj(net, torch.rand(2, 1, 32, 32), {"label": torch.zeros(2, dtype=torch.long)}, "train",
            Guided(torch.arange(4).repeat(2, 1), keep_counts=torch.tensor([2, 4])))
    with pytest.raises(ValueError, match="budget must be one of"):
        TokenDrop(net, budget="area")
    with pytest.raises(ValueError, match="budget_range"):
        TokenDrop(net, budget="entropy", budget_range=(1.2, 1.5))
    with pytest.raises(ValueError, match="random_share > 0 needs budget=fixed"):
        TokenDrop(net, budget="entropy", random_share=0.25)
