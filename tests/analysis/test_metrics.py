"""siftguide.analysis.metrics: known values of the pure functions (bins, flow ratios, attention split, KL,
Spearman, distances, entropy, poor share); one KL with the guidance loss; Spearman against torchmetrics."""
from __future__ import annotations

import math

import pytest
import torch

from siftguide.analysis.analyze import (attention_entropy, average_ranks, bin_flow, bin_labels, concentration_bins,
                                        concentration_thresholds, kl_divergence, mean_attention_distance,
                                        patch_distances, poor_share, spearman, split_attention)
from tests.helpers import close


def test_bins_and_labels():
    counts = torch.tensor([[0, 1, 2, 5], [3, 0, 0, 1]])
    assert concentration_bins(counts, (1, 2)).tolist() == [[0, 1, 2, 2], [2, 0, 0, 1]]
    assert bin_labels((1, 2)) == ["0", "1", "2+"]
    assert bin_labels((1, 4)) == ["0", "1-3", "4+"]
    # terciles of the pooled counts: 6 patches with 0, 3 with 1, 3 with 4 keypoints -> <=0 | 1 | >=2
    hist = torch.zeros(17)
    hist[0], hist[1], hist[4] = 6, 3, 3
    assert concentration_thresholds(hist, "tercile") == (1, 2)
    hist = torch.zeros(17)
    hist[0], hist[2], hist[5] = 3, 3, 3
    assert concentration_thresholds(hist, "tercile") == (1, 3)
    assert concentration_thresholds(hist, "fixed") == (1, 2)
    with pytest.raises(ValueError, match="bin scheme"):
        concentration_thresholds(hist, "quartile")


def test_flow_ratios_by_hand():
    """P = 4 patches in bins [0, 0, 1, 2]; every query attends only to patch 3 (the rich one)."""
    bins = torch.tensor([[0, 0, 1, 2]])
    onehot = torch.zeros(1, 1, 4, 4)
    onehot[..., 3] = 1.0
    flow, uniform = bin_flow(onehot, bins, 3)
    assert flow[0, 0].tolist() == [[0, 0, 2], [0, 0, 1], [0, 0, 1]]  # 2 queries in bin 0, 1 in bins 1 and 2
    assert close(uniform[0], torch.tensor([[4, 2, 2], [2, 1, 1], [2, 1, 1]]) / 4)
    ratio = flow[0, 0] / uniform[0]
    assert close(ratio[:, 2], [4.0, 4.0, 4.0]) and close(ratio[:, :2], torch.zeros(3, 2))  # all to rich: P / n_rich
    uni = torch.full((1, 2, 4, 4), 0.25)
    f, u = bin_flow(uni, bins, 3)
    assert close(f[0] / u[0], torch.ones(2, 3, 3))  # uniform attention: every ratio is 1


def test_split_attention_removes_prefix_and_renormalises():
    a = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.0, 0.2, 0.8]]).view(1, 1, 3, 3)
    patch, cls, to_patches = split_attention(a, num_prefix=1, cls_index=0)
    assert close(patch[0, 0], [[1.0, 0.0], [0.2, 0.8]])
    assert close(cls[0, 0], [0.5, 0.5]) and close(to_patches[0, 0], [0.5, 1.0])
    _, no_cls, _ = split_attention(a[:, :, 1:, 1:], num_prefix=0, cls_index=-1)  # mean received over queries
    assert close(no_cls[0, 0], [0.6, 0.4])  # rows [1, 0] and [0.2, 0.8], averaged
    with pytest.raises(ValueError, match=r"\(B, heads, N, N\)"):
        split_attention(torch.zeros(3, 3), 1, 0)


def test_kl_spearman_distance_entropy():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert close(kl_divergence(p, p), 0.0)
    assert close(kl_divergence(p, torch.full((4,), 0.25)), 0.5 * math.log(2))
    assert close(average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    x = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert close(spearman(x, x), 1.0) and close(spearman(x, -x), -1.0)
    assert math.isnan(float(spearman(x, torch.ones(4))))  # constant: undefined
    e5, e0 = torch.zeros(16), torch.zeros(16)
    e5[5], e0[0] = 1, 1
    assert close(spearman(e5, e0), -1 / 15)
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 4, (5, 16), generator=g).float(), torch.rand(5, 16, generator=g)
    want = [scipy_stats.spearmanr(a[i], b[i]).statistic for i in range(5)]
    assert close(spearman(a, b), want)
    d = patch_distances((2, 2))
    assert close(d[0], [0.0, 1.0, 1.0, math.sqrt(2)])
    to_corner = torch.zeros(1, 1, 4, 4)
    to_corner[..., 3] = 1.0
    assert close(mean_attention_distance(to_corner, (2, 2)), (math.sqrt(2) + 1 + 1 + 0) / 4)
    assert close(mean_attention_distance(torch.eye(4).view(1, 1, 4, 4), (2, 2)), 0.0)
    assert close(attention_entropy(torch.full((8,), 1 / 8)), math.log(8))
    share, uniform = poor_share(torch.tensor([[0.7, 0.1, 0.2, 0.0]]), torch.tensor([[0, 3, 1, 0]]))
    assert close(share, [0.7]) and close(uniform, [0.5])


def test_one_kl_for_the_guidance_loss_and_the_analysis():
    from siftguide.guidance.attention import divergence, kl_divergence as guidance_kl

    assert kl_divergence is guidance_kl
    g = torch.Generator().manual_seed(0)
    rel = torch.rand(4, 3, 16, generator=g) * (torch.rand(4, 3, 16, generator=g) > 0.3)  # zeros in p
    rel = rel / rel.sum(-1, keepdim=True)
    att = torch.softmax(4 * torch.randn(4, 3, 16, generator=g), -1)
    att[0, 0] = torch.nn.functional.one_hot(torch.tensor(3), 16).float()  # zeros in q
    # the training loss is bit for bit what divergence(kind="kl") computed before
    former_loss = (torch.xlogy(rel, rel) - rel * torch.log(att + 1e-8)).sum(-1)
    assert torch.equal(divergence(att, rel, "kl", 1e-8), former_loss)
    # the analysis floors q at 1e-12 (InterrelationStats and prompt call kl_divergence(r, q.clamp_min(EPS), 0.0)):
    # what its own KL computed before, though q holds values far below 1e-12 here
    p, q = torch.broadcast_tensors(rel, att)
    former = torch.where(p > 0, p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log()), torch.zeros_like(p)).sum(-1)
    assert torch.allclose(kl_divergence(rel, att.clamp_min(1e-12), 0.0), former, rtol=1e-6, atol=1e-6)
    assert kl_divergence(rel[:, :1], att, 1e-12).shape == (4, 3)  # (B, 1, P) relevance against (B, h, P) heads


def test_spearman_agrees_with_torchmetrics_except_on_constant_rows():
    # torchmetrics' spearman_corrcoef on columns: equal on every non-constant row, ties included (up to its
    # 1e-6 in the denominator); a constant row gives 0 there, NaN here (undefined: the analysis skips such images)
    from torchmetrics.functional import spearman_corrcoef

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (6, 16), generator=g).float()  # keypoint counts: many ties
    b = torch.rand(6, 16, generator=g)
    b[2, :8] = b[2, 8:]  # ties in both
    ours, theirs = spearman(a, b), spearman_corrcoef(a.T, b.T)
    assert close(ours, theirs)
    b[4] = 0.25
    ours, theirs = spearman(a, b), spearman_corrcoef(a.T, b.T)
    assert math.isnan(float(ours[4])) and float(theirs[4]) == 0.0
    keep = torch.arange(6) != 4
    assert close(ours[keep], theirs[keep])
