"""siftguide.analysis.analyze: known values of the pure functions, forced attention through a real tiny ViT, and the
command line end to end (tiny checkpoint, timm name with the random-init fallback, user errors)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from siftguide.analysis.analyze import (
    RANDOM_INIT, InterrelationStats, attention_entropy, average_ranks, bin_flow, bin_labels, collect,
    concentration_bins, concentration_thresholds, kl_divergence, main, mean_attention_distance, patch_distances,
    poor_share, spearman, split_attention,
)
from siftguide.relevance import keypoint_patch_counts
from tests.conftest import blob_image, compose_cfg

nan = float("nan")


def close(a, b, tol=1e-5) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.allclose(a, b, atol=tol, rtol=tol, equal_nan=True))


# ------------------------------------------------------------------------------------------------ pure functions
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
    from siftguide.guidance.alignment import divergence, kl_divergence as guidance_kl

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


# ------------------------------------------------------------------------------------------------ forced attention
def _forced_vit(targets: dict[int, list[int | None]]) -> torch.nn.Module:
    """A tiny timm ViT (32 px, 8 px patches, 2 blocks, 2 heads) whose attention probabilities are replaced: for block
    ``l`` and head ``k``, ``targets[l][k]`` is the token every query attends to (``None``: uniform attention)."""
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            embed_dim=32, num_heads=2, in_chans=1, num_classes=3)

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


def test_collect_with_forced_attention_on_known_keypoint_patches():
    img = blob_image(32, center=(12.0, 12.0), sigma=2.0, batch=2)  # a bright blob inside patch (1, 1) = index 5
    counts = keypoint_patch_counts(img, 8)[0].flatten()
    assert counts[5] >= 2 and counts.sum() == counts[5]  # keypoints only in patch 5: n_0 = 15, n_2+ = 1
    # block 0: uniform; block 1: head 0 -> patch 5 (rich, token 6), head 1 -> patch 0 (keypoint-poor, token 1)
    net = _forced_vit({0: [None, None], 1: [6, 1]})
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


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A siftguide checkpoint of the tiny test config after 2 optimizer steps."""
    from siftguide.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(out, ["trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.knn=null",
                            "data.train_subset=64", "data.val_size=32", "data.batch_size=16"])
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


def test_cli_on_a_checkpoint(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "an"
    assert main([str(tiny_ckpt), "--out", str(out), "--num-images", "24", "--batch-size", "12", "--overlays", "2",
                 "--top", "2", "--no-progress", "--layer", "0", "--head", "1"]) == 0
    for f in ("metrics.csv", "metrics_layers.csv", "report.md", "heatmaps.png", "interrelation.png", "overlays.png",
              "spurious_images.csv", "spurious_classes.csv", "spurious_overlays.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 2 * 2 and list(m[["layer", "head"]].itertuples(index=False, name=None)) == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    for col in ("recv_kp0", "recv_kp2plus", "cls_ratio_kp0", "rich_to_poor", "poor_to_rich", "kl", "spearman",
                "distance", "entropy"):
        assert col in m.columns and m[col].notna().all(), col
    assert (m["kl"] >= 0).all() and (m["spearman"].abs() <= 1).all()
    imgs, classes = pd.read_csv(out / "spurious_images.csv"), pd.read_csv(out / "spurious_classes.csv")
    assert len(imgs) == 24 and imgs["attn_poor_excess"].is_monotonic_decreasing
    assert classes["images"].sum() == 24 and "grad_poor_share" in imgs.columns
    report = (out / "report.md").read_text()
    assert "trained checkpoint" in report and "RANDOM INIT" not in report and "--num-images 24" in report
    assert "CLS attn, layer 0, head 1" in report and "## Spurious-correlation candidates" in report
    assert "mean [0.286] std [0.353]" in report  # the run's own normalisation
    # errors: a checkpoint's input size is fixed
    with pytest.raises(SystemExit) as e:
        main([str(tiny_ckpt), "--out", str(out), "--img-size", "40"])
    assert e.value.code == 2 and "image size mismatch" in capsys.readouterr().err


def test_cli_timm_name_falls_back_to_random_init(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # no download attempt (and no retries) in tests
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))  # and no locally cached weights
    folder = tmp_path / "imgs"
    folder.mkdir()
    blob = (blob_image(40, center=(12.0, 20.0), sigma=3.0)[0, 0] * 255).byte().numpy()
    Image.fromarray(blob).save(folder / "grey.png")
    Image.fromarray(np.stack([blob, blob[::-1], blob.T], -1)).save(folder / "rgb.jpg")
    out = tmp_path / "an"
    args = ["vit_tiny_patch16_224", "--out", str(out), "--images", str(folder), "--no-progress", "--spurious",
            "--model-arg", "patch_size=8", "--model-arg", "depth=2", "--model-arg", "embed_dim=32",
            "--model-arg", "num_heads=2", "--img-size", "32"]
    assert main(args) == 0
    assert RANDOM_INIT in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert RANDOM_INIT in report and "folder" in report and "input 32x32, 3 channel(s)" in report
    assert len(pd.read_csv(out / "metrics.csv")) == 4
    classes = pd.read_csv(out / "spurious_classes.csv")
    assert classes["images"].sum() == 2 and classes["accuracy"].isna().all()  # ImageNet classes: no accuracy
    assert "predicted class" in report


def test_cli_errors(tmp_path, usage_error):
    err = usage_error(main)
    out = ["--out", str(tmp_path / "o")]
    assert "checkpoint not found" in err([str(tmp_path / "missing.ckpt"), *out])
    assert "neither an existing checkpoint nor a timm model name" in err(["not_a_model_xyz", *out])
    (tmp_path / "empty").mkdir()
    tiny = ["--random-init", "--model-arg", "depth=1", "--model-arg", "embed_dim=16", "--model-arg", "num_heads=1",
            "--model-arg", "patch_size=8"]
    assert "no image files" in err(["vit_tiny_patch16_224", *out, *tiny, "--img-size", "32", "--images",
                                    str(tmp_path / "empty")])
    assert "does not divide the image size" in err(["vit_tiny_patch16_224", *out, *tiny, "--img-size", "30"])
    assert "--head 5 out of range" in err(["vit_tiny_patch16_224", *out, *tiny, "--img-size", "32", "--head", "5",
                                           "--images", str(tmp_path)])
