"""siftguide.analysis.interrelation: the statistics of uniform and relevance-aligned attention, and collect() on a
real tiny ViT whose attention is forced onto known keypoint patches."""
from __future__ import annotations

import math

import torch

from siftguide.analysis.analyze import InterrelationStats, collect, kl_divergence, patch_distances, poor_share
from siftguide.relevance import keypoint_patch_counts
from tests.conftest import blob_image
from tests.helpers import close

nan = float("nan")


def test_stats_uniform_attention_is_ratio_one_and_kl_zero_when_cls_equals_relevance():
    """Two layers: uniform attention, and a CLS row equal to the relevance map."""
    torch.manual_seed(0)
    b, h, p = 3, 2, 9
    counts = torch.randint(0, 4, (b, p)).float()
    counts[:, 0] = 0  # every bin is populated
    counts[0, 1], counts[0, 2] = 1, 3
    rel = counts / counts.sum(1, keepdim=True)
    uniform = torch.full((b, h, p + 1, p + 1), 1 / (p + 1))
    aligned = uniform.clone()
    aligned[:, :, 0] = torch.cat([torch.zeros(b, 1), rel], 1).unsqueeze(1)  # CLS attends exactly like relevance
    st = InterrelationStats([0, 1], h, (3, 3), num_prefix=1, cls_index=0)
    st.update({0: uniform, 1: aligned}, counts, rel)
    res = st.result((1, 2))
    assert close(res["ratio"], torch.ones(2, h, 3, 3)) and close(res["recv"], torch.ones(2, h, 3))
    assert close(res["send"], torch.ones(2, h, 3))
    assert close(res["cls_ratio"][0], torch.ones(h, 3)) and close(res["prefix_share"], torch.full((2, h), 0.1))
    assert close(res["kl"][1], torch.zeros(h)) and close(res["spearman"][1], torch.ones(h))
    assert close(res["kl"][0], kl_divergence(rel, torch.full((p,), 1 / p)).mean().expand(h))
    assert close(res["entropy"], torch.full((2, h), math.log(p)))
    assert close(res["patches_per_image"].sum(), p)


def _forced_vit(tiny_vit, targets: dict[int, list[int | None]]) -> torch.nn.Module:
    """The tiny timm ViT (32 px, 8 px patches, 2 blocks, 2 heads) whose attention probabilities are replaced: for block
    ``l`` and head ``k``, ``targets[l][k]`` is the token every query attends to (``None``: uniform attention)."""
    net = tiny_vit(seed=None)

    def hook_for(layer):
        def hook(_m, args):
            b, h, n, _ = args[0].shape
            out = torch.full_like(args[0], 1.0 / n)
            for k, tok in enumerate(targets[layer]):
                if tok is not None:
                    out[:, k] = 0.0
                    out[:, k, :, tok] = 1.0
            return (out,)

        return hook

    for i, blk in enumerate(net.blocks):
        blk.attn.fused_attn = False  # the gradient pass also takes the explicit path, with the forced probabilities
        blk.attn.attn_drop.register_forward_pre_hook(hook_for(i))
    return net


def test_collect_with_forced_attention_on_known_keypoint_patches(tiny_vit):
    img = blob_image(32, center=(12.0, 12.0), sigma=2.0, batch=2)  # a bright blob inside patch (1, 1) = index 5
    counts = keypoint_patch_counts(img, 8)[0].flatten()
    assert counts[5] >= 2 and counts.sum() == counts[5]  # keypoints only in patch 5: n_0 = 15, n_2+ = 1
    # block 0: uniform; block 1: head 0 -> patch 5 (rich, token 6), head 1 -> patch 0 (keypoint-poor, token 1)
    net = _forced_vit(tiny_vit, {0: [None, None], 1: [6, 1]})
    batch = {"image": img, "label": torch.tensor([0, 1]), "index": [0, 1]}
    col = collect(net, [batch], mean=(0.5,), std=(0.5,), layer=-1, head=1, gradients=True)
    res = col.stats.result((1, 2))
    assert res["labels"] == ["0", "1", "2+"] and close(res["patches_per_image"], [15, 0, 1])
    # uniform block: ratio 1 wherever a bin is populated (bin "1" is empty: NaN), KL(one-hot || uniform) = log 16
    assert close(res["ratio"][0, :, 0, 0], [1, 1]) and close(res["ratio"][0, :, 2, 0], [1, 1])
    assert res["ratio"][0, :, 1].isnan().all() and res["recv"][0, :, 1].isnan().all()
    assert close(res["recv"][0][:, [0, 2]], torch.ones(2, 2)) and close(res["kl"][0], [math.log(16)] * 2)
    assert res["spearman"][0].isnan().all()  # uniform CLS attention: no ranking
    # head 0 of block 1: everything flows to the rich patch: ratio P / n_rich = 16, recv 16, CLS share 1, KL 0
    assert close(res["ratio"][1, 0, 0], [0, nan, 16]) and close(res["ratio"][1, 0, 2], [0, nan, 16])
    assert close(res["recv"][1, 0], [0, nan, 16]) and close(res["cls_share"][1, 0], [0, 0, 1])
    assert close(res["cls_ratio"][1, 0], [0, nan, 16])
    assert close(res["kl"][1, 0], 0.0) and close(res["spearman"][1, 0], 1.0) and close(res["entropy"][1, 0], 0)
    assert close(res["send"][1, 0], [17 / 16, nan, 17 / 16]) and close(res["prefix_share"][1, 0], 0.0)
    assert close(res["distance"][1, 0], patch_distances((4, 4))[:, 5].mean())
    # head 1: everything to the keypoint-poor corner: ratio P / n_0 = 16 / 15, Spearman(e5, e0) = -1 / 15
    assert close(res["ratio"][1, 1, 2], [16 / 15, nan, 0]) and close(res["recv"][1, 1], [16 / 15, nan, 0])
    assert close(res["spearman"][1, 1], -1 / 15) and close(res["cls_share"][1, 1], [1, 0, 0])
    # per image, chosen layer -1 / head 1: all CLS attention on poor patches; excess over uniform 1 / 16
    share, uniform = poor_share(col.cat("attn"), col.cat("counts"))
    assert close(share, [1, 1]) and close(uniform, [15 / 16] * 2)
    assert col.cat("grad").shape == (2, 16) and close(col.cat("grad").sum(1), [1, 1])
