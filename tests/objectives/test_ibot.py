"""siftguide.objectives.dino / ibot: the EMA teacher gets no gradient and follows the student; the student never sees a
masked patch; the masks come from a guidance mode (AttMask's rule on the relevance) or the objective's own pattern
(block, random, the teacher's attention), with the drawn count per image; multi-crop views carry their pixel matrices;
bad settings stop before training; a tiny run trains, logs and resumes exactly."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from siftguide.data import MultiCropTransform
from siftguide.guidance import AttMask
from siftguide.objectives import DINOObjective, Guided, IBOTObjective
from siftguide.relevance import detect_keypoints, transform_keypoints
from siftguide.train import train
from tests.conftest import blob_image

HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def _setup(tiny_vit, cls=IBOTObjective, **kw):
    net = tiny_vit(dynamic_img_size=True, num_classes=0)
    obj = cls(**HEAD, total_steps=10, num_classes=3, **kw)
    obj.setup(net)
    return net, obj


def _batch(b=3):
    return {"label": torch.tensor([0, 1, 2])[:b], "index": torch.arange(b),
            "local_views": torch.rand(2 * b, 1, 16, 16)}


def test_the_teacher_gets_no_gradient_and_follows_the_student_by_ema(tiny_vit):
    net, obj = _setup(tiny_vit, DINOObjective)
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    out = obj(net, torch.rand(6, 1, 32, 32), _batch(), "train", None, 0)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert all(p.grad is None for p in obj.teacher_head.parameters())
    assert any(p.grad is not None for p in net.parameters()) and any(p.grad is not None for p in obj.head.parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # a step of the student
    obj.on_train_batch_end(net, 0)
    m = obj.current_momentum(0)
    assert m == pytest.approx(0.996)
    for (name, t), s in zip(obj.teacher.named_parameters(), net.parameters()):
        torch.testing.assert_close(t, m * before[name] + (1 - m) * s, msg=name)
    assert obj.current_momentum(9) == 1.0 and set(out.metrics) >= {"dino_loss", "probe_loss", "teacher_temp"}


def test_the_student_never_sees_a_masked_patch(tiny_vit):
    net, obj = _setup(tiny_vit)
    x = torch.rand(2, 1, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 5, 10]] = True
    y = x.clone()
    y[:, :, 0:8, 0:8] = 1.0  # patch 0 of both images changed: masked, so unseen
    a, b = (obj.encode_globals(net, v, Guided(patch_mask=mask)) for v in (x, y))
    torch.testing.assert_close(a, b)
    c = obj.encode_globals(net, y, Guided(patch_mask=torch.zeros_like(mask)))
    assert not torch.allclose(a, c)  # unmasked, the change is seen


@pytest.mark.parametrize("pattern", ["block", "random", "attention"])
def test_own_masks_have_the_drawn_count_per_view(tiny_vit, pattern):
    net, obj = _setup(tiny_vit, mask_pattern=pattern, masked_share=1.0, mask_ratio=(0.25, 0.25))
    seen = []
    obj.patch_loss.forward, real = (lambda t, s, m, temp=None: seen.append(m) or real(t, s, m, temp)), \
        obj.patch_loss.forward
    out = obj(net, torch.rand(6, 1, 32, 32), _batch(), "train", None, 0)
    (mask,) = seen
    assert mask.shape == (6, 16) and (mask.sum(1) == 4).all()  # round(0.25 * 16) per view, every view masked
    assert torch.isfinite(out.loss) and out.metrics["masked_share"] == 0.25


def test_the_guidance_mode_masks_the_most_relevant_patches(tiny_vit):
    """attmask (AttMask-High on the relevance map): the masks the objective uses are the top-`count` patches."""
    net, obj = _setup(tiny_vit)
    rel = torch.rand(6, 4, 4)
    counts = torch.tensor([0, 2, 4, 6, 8, 3])
    mask = AttMask().patch_mask(rel, 0, counts)
    top = rel.flatten(1).argsort(1, descending=True)
    for i, k in enumerate(counts.tolist()):
        assert set(mask[i].nonzero().flatten().tolist()) == set(top[i, :k].tolist())
    AttMask().check(obj)
    with pytest.raises(ValueError, match="attmask cannot serve objective DINOObjective"):
        AttMask().check(DINOObjective(**HEAD))
    seen = []
    obj.patch_loss.forward, real = (lambda t, s, m, temp=None: seen.append(m) or real(t, s, m, temp)), \
        obj.patch_loss.forward
    obj(net, torch.rand(6, 1, 32, 32), _batch(), "train", Guided(patch_mask=mask), 0)
    assert torch.equal(seen[0], mask)


@pytest.mark.parametrize("guided", [0.0, 1.0])
def test_view_matrices_map_keypoints_into_global_and_local_crops(guided):
    """A blob drawn on the image: its keypoint mapped through a view's matrix lands on the blob in that view (also
    when guided crops move the crops, here onto a map of the image's top-left quarter)."""
    torch.manual_seed(0)
    img = blob_image(64, center=(40.0, 24.0), sigma=3.0, batch=4)
    t = MultiCropTransform(64, hflip=True, global_scale=(0.5, 1.0), local_crops=2, local_size=32,
                           local_scale=(0.3, 0.5), guided_crops=guided)
    quarter = torch.zeros(4, 8, 8)
    quarter[:, :4, :4] = 1.0
    v = t.views(img, True, relevance=lambda x: quarter)
    kp = detect_keypoints(t.resize(img), max_keypoints=1)
    for views, matrix, size in ((v.image, v.matrix, 64), (v.local * t.std + t.mean, v.local_matrix, 32)):
        mapped = transform_keypoints(kp.repeat(views.shape[0] // 4), matrix, (size, size))
        assert mapped.valid[:, 0].sum() >= 2, size  # the check below is not vacuous
        for i in range(views.shape[0]):
            if not mapped.valid[i, 0]:
                continue  # cropped out of this view
            x, y = mapped.xy[i, 0].round().long().tolist()
            patch = views[i, 0, max(y - 1, 0): y + 2, max(x - 1, 0): x + 2]
            assert patch.max() > 0.6, (size, i)  # the blob's peak is there (background 0.1)


@pytest.mark.parametrize("kw, match", [
    (dict(mask_ratio=(0.0, 0.5)), "objective.mask_ratio"), (dict(mask_ratio=(0.2, 1.0)), "objective.mask_ratio"),
    (dict(mask_pattern="grid"), "objective.mask_pattern"), (dict(masked_share=1.5), "objective.masked_share")])
def test_bad_mask_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        IBOTObjective(**HEAD, **kw)


def test_more_local_crops_than_memory_allows_stop_before_training(tiny_cfg):
    from siftguide.run.checks import ConfigError

    with pytest.raises(ConfigError, match=r"transform.local_crops=100000 .* GiB of activations"):
        train(tiny_cfg(["experiment=ibot_fm", "transform.local_size=16", "transform.local_crops=100000",
                        "data.batch_size=32"], name="huge"))


IBOT = ["experiment=ibot_fm", "transform.local_size=16", "objective.out_dim=64", "objective.hidden_dim=32",
        "objective.bottleneck_dim=16", "data.batch_size=16", "callbacks.knn.bank_size=32",
        "callbacks.knn.query_size=32", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "callbacks.attention_divergence.batches=1"]


def test_guided_crops_alone_set_up_the_relevance_and_train(tiny_cfg):
    """transform.guided_crops with iBOT's own block masks: no guidance mode reads the relevance, the crops do (the
    keypoint cache is built for them)."""
    cfg = tiny_cfg([*IBOT, "transform.guided_crops=0.5", "relevance.cache=true", "relevance.cache_dir=null",
                    "trainer.max_steps=2"], name="crops")
    train(cfg)
    m = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
    assert m["train/ibot_loss"].notna().sum() == 2 and m["val/knn_acc"].notna().any()


def test_a_tiny_ibot_run_with_sift_masks_trains_and_resumes_exactly(tiny_cfg, monkeypatch):
    """objective=ibot with guidance=attmask: the losses and the teacher's kNN are logged; killed after step 3 and
    resumed from the checkpoint of step 2, the run ends with the uninterrupted run's metrics."""
    from tests.helpers import killed_at, logged_rows

    full = tiny_cfg([*IBOT, "guidance=attmask"], name="full")
    train(full)
    m = pd.read_csv(Path(full.paths.output_dir) / "metrics.csv")
    for key in ("train/dino_loss", "train/ibot_loss", "val/knn_acc", "val/acc", "val/attn_div", "train/weight_decay"):
        assert m[key].notna().any(), key
    assert 0 < m["train/masked_share"].dropna().max() < 0.5
    cut = tiny_cfg([*IBOT, "guidance=attmask"], name="cut")
    with monkeypatch.context() as mp:
        killed_at(mp, 3)
        with pytest.raises(RuntimeError, match="killed"):
            train(cut)
    train(tiny_cfg([*IBOT, "guidance=attmask", "ckpt_path=last"], name="cut"))
    a, b = logged_rows(Path(full.paths.output_dir)), logged_rows(Path(cut.paths.output_dir))
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
