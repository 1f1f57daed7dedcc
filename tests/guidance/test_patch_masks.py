"""siftguide.guidance.patch_masks: exact per-image counts for every generator, the top-scoring patches, AttMask's
most relevant patches (and hints), blocks more clustered than random masks; bad arguments fail."""
import pytest
import torch
import torch.nn.functional as F

from siftguide.guidance.patch_masks import (block_patch_mask, draw_mask_counts, masks_from_scores, random_patch_mask,
                                            relevance_patch_mask)

GRID = (6, 8)
P = GRID[0] * GRID[1]
COUNTS = torch.tensor([0, 1, 7, P // 2, P - 1, P])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def masked_neighbours(mask, grid):
    """Mean number of masked 4-neighbours per masked patch."""
    m = mask.view(-1, 1, *grid).float()
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return ((F.conv2d(m, kernel, padding=1) * m).sum() / m.sum()).item()


def test_draw_mask_counts_masks_a_share_of_the_images_at_ratios_in_range():
    counts = draw_mask_counts(4000, 196, 0.1, 0.5, masked_share=0.5, generator=gen())
    assert counts.shape == (4000,) and counts.dtype == torch.long
    masked = counts[counts > 0]
    assert 0.47 < len(masked) / 4000 < 0.53
    assert masked.min() >= round(0.1 * 196) and masked.max() <= round(0.5 * 196)
    assert 0.28 * 196 < masked.float().mean() < 0.32 * 196  # uniform ratio: mean 0.3
    assert (draw_mask_counts(64, 196, 0.1, 0.5, masked_share=1.0, generator=gen()) > 0).all()
    assert (draw_mask_counts(64, 196, 0.1, 0.5, masked_share=0.0, generator=gen()) == 0).all()
    assert torch.equal(draw_mask_counts(8, 16, 0.2, 0.2, 1.0), torch.full((8,), 3))  # round(0.2 * 16)
    assert torch.equal(draw_mask_counts(32, 49, 0.1, 0.5, generator=gen(3)), draw_mask_counts(32, 49, 0.1, 0.5,
                                                                                            generator=gen(3)))


@pytest.mark.parametrize("kw, match", [(dict(ratio_min=0.0), "ratio_min"), (dict(ratio_min=0.6), "ratio_min"),
                                       (dict(ratio_max=1.0), "ratio_max"), (dict(masked_share=1.5), "masked_share"),
                                       (dict(masked_share=-0.1), "masked_share"), (dict(batch=0), "batch"),
                                       (dict(num_patches=0), "num_patches")])
def test_draw_mask_counts_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        draw_mask_counts(**{"batch": 4, "num_patches": 16, "ratio_min": 0.1, "ratio_max": 0.5, **kw})


def test_masks_from_scores_takes_the_top_counts():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.1, 0.9, 0.5, 0.3], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 1.0]])
    mask = masks_from_scores(scores, torch.tensor([2, 0, 3, 4]))
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[False, True, True, False], [False] * 4, [True, True, True, False], [True] * 4]
    with pytest.raises(ValueError, match=r"scores of shape \(B, P\)"):
        masks_from_scores(torch.rand(4), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"counts must have shape \(B,\) = \(4,\)"):
        masks_from_scores(scores, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="counts must be an integer tensor"):
        masks_from_scores(scores, torch.tensor([1.0, 2.0, 1.0, 1.0]))


@pytest.mark.parametrize("make", [
    lambda c, g: random_patch_mask(c, GRID, generator=g),
    lambda c, g: block_patch_mask(c, GRID, generator=g),
    lambda c, g: block_patch_mask(c, GRID, generator=g, min_aspect=1.0, max_blocks=1, min_block_patches=1),
    lambda c, g: relevance_patch_mask(torch.rand(len(c), *GRID, generator=g), c, generator=g),
    lambda c, g: relevance_patch_mask(torch.rand(len(c), P, generator=g), c, hints=0.3, generator=g),
    lambda c, g: relevance_patch_mask(torch.zeros(len(c), *GRID), c, hints=0.5, generator=g),
], ids=["random", "block", "block-one-square", "relevance", "relevance-hints", "relevance-constant-hints"])
def test_every_mask_has_exactly_counts_masked_patches(make):
    g = gen(1)
    for _ in range(5):
        counts = torch.cat([COUNTS, torch.randint(0, P + 1, (20,), generator=g)])
        mask = make(counts, g)
        assert mask.shape == (len(counts), P) and mask.dtype == torch.bool
        assert torch.equal(mask.sum(1), counts)


def test_random_masks_are_uniform_and_reproducible():
    mask = random_patch_mask(torch.full((2000,), 12), GRID, generator=gen())
    freq = mask.float().mean(0)
    assert (freq - 12 / P).abs().max() < 0.05
    assert torch.equal(random_patch_mask(COUNTS, GRID, gen(5)), random_patch_mask(COUNTS, GRID, gen(5)))


def test_block_masks_are_more_clustered_than_random_masks():
    grid = (14, 14)
    counts = draw_mask_counts(200, 196, 0.1, 0.5, masked_share=1.0, generator=gen())
    block = masked_neighbours(block_patch_mask(counts, grid, generator=gen(1)), grid)
    rand = masked_neighbours(random_patch_mask(counts, grid, generator=gen(1)), grid)
    assert rand < 1.5 and block > 2.8, (block, rand)  # random ~1.25 (~0.3 * 3.7); blocks ~3.3 (lightly iBOT-style ~3.1)


def test_relevance_mask_hides_the_most_relevant_patches():
    relevance = torch.rand(16, *GRID, generator=gen())
    counts = torch.randint(0, P + 1, (16,), generator=gen(1))
    mask = relevance_patch_mask(relevance, counts, generator=gen(2))
    for row, r, c in zip(mask, relevance.flatten(1), counts):
        assert set(row.nonzero().flatten().tolist()) == set(r.topk(int(c)).indices.tolist())
    # ties (a flat map) are broken at random: exact counts, different patches per image
    flat = relevance_patch_mask(torch.ones(16, P), torch.full((16,), 10), generator=gen())
    assert torch.equal(flat.sum(1), torch.full((16,), 10)) and len({tuple(r.tolist()) for r in flat}) > 1
    # a scaled relevance map gives the same mask (the tie-breaking noise is relative)
    assert torch.equal(relevance_patch_mask(relevance * 1e-4, counts, generator=gen(2)), mask)


def test_relevance_hints_reveal_top_patches_and_mask_the_next_ranked():
    b, p, count, hints = 64, 64, 20, 0.25  # H = 5 revealed among the top round(0.25 * 64) = 16, ranks 20..24 masked
    relevance = torch.stack([torch.randperm(p, generator=gen(i)).float() for i in range(b)])
    rank = relevance.argsort(1, descending=True).argsort(1)  # 0 = most relevant
    mask = relevance_patch_mask(relevance, torch.full((b,), count), hints=hints, generator=gen())
    ranks_masked = [set(r[m].tolist()) for r, m in zip(rank, mask)]
    for s in ranks_masked:
        assert len(s) == count
        assert set(range(16, 25)) <= s and not s & set(range(25, p))  # ranks 16..19 kept, next 5 masked instead
        assert len(s & set(range(16))) == 16 - 5  # 5 of the top 16 revealed
    revealed = [frozenset(range(16)) - s for s in ranks_masked]
    assert len(set(revealed)) > 1 and set().union(*revealed) == set(range(16))  # drawn at random in the pool
    with pytest.raises(ValueError, match="hints"):
        relevance_patch_mask(relevance, torch.full((b,), count), hints=1.0)


@pytest.mark.parametrize("call, match", [
    (lambda: random_patch_mask(torch.tensor([1]), (0, 4)), "grid"),
    (lambda: random_patch_mask(torch.tensor([1]), (4,)), "grid"),
    (lambda: random_patch_mask(torch.tensor([[1]]), (4, 4)), "counts"),
    (lambda: random_patch_mask(torch.tensor([True]), (4, 4)), "counts"),
    (lambda: block_patch_mask(torch.tensor([1]), (4, 4), min_aspect=0.0), "min_aspect"),
    (lambda: block_patch_mask(torch.tensor([1]), (4, 4), min_aspect=2.0), "min_aspect"),
    (lambda: block_patch_mask(torch.tensor([1]), (4, 4), max_blocks=0), "max_blocks"),
    (lambda: block_patch_mask(torch.tensor([1]), (4, 4), min_block_patches=0), "min_block_patches"),
    (lambda: relevance_patch_mask(torch.rand(16), torch.tensor([1]), 0.0), "relevance"),
    (lambda: relevance_patch_mask(torch.rand(2, 16), torch.tensor([1]), 0.0), r"counts must have shape \(B,\)"),
    (lambda: relevance_patch_mask(torch.rand(2, 16), torch.tensor([1, 1]), -0.1), "hints"),
])
def test_mask_generators_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_on_cuda_without_host_syncs():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    relevance = torch.rand(8, *GRID, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counts = draw_mask_counts(8, P, 0.1, 0.5, generator=g, device=dev)
        masks = [random_patch_mask(counts, GRID, g), block_patch_mask(counts, GRID, g),
                 relevance_patch_mask(relevance, counts, generator=g),
                 relevance_patch_mask(relevance, counts, hints=0.2, generator=g)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(m.device.type == "cuda" and torch.equal(m.sum(1), counts) for m in masks)
