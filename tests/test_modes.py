"""Guidance modes: off switches are exact, each mode changes what it claims, controls use the wrong map,
bad settings fail clearly. Tiny timm ViTs, synthetic images and relevance with known structure."""
import contextlib
import copy

import pytest
import timm
import torch

from siftguide.guidance import (AttentionPrior, BackgroundSuppression, Guidance, KeypointMasking,
                                KeypointReconWeight, PatchInterrelation, SiftGuidance, TokenDrop, guided_masking,
                                interrelation_target, keypoint_weights, select_tokens, weighted_patch_loss)
from siftguide.objectives import MAEObjective, SupervisedObjective
from siftguide.relevance import foreground_relevance, roll_relevance
from siftguide.relevance import RelevanceSource
from tests.conftest import blob_image


def vit(depth=2, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                             depth=depth, embed_dim=32, num_heads=2, in_chans=1, **kw)


def corner_relevance(b=4, grid=4, rich=(0, 1, 4, 5)):
    """All relevance on the top-left 2x2 patches."""
    r = torch.zeros(b, grid * grid)
    r[:, list(rich)] = 1.0 / len(rich)
    return r.view(b, grid, grid)


def step(net, guidance, objective, x, y, rel):
    """One optimizer step as PretrainModule.training_step takes it; returns the total loss."""
    batch = {"image": x, "label": y, "relevance": rel}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    keep = guidance.select_tokens(rel) if guidance is not None else None
    ctx = guidance.forward(rel, "train", keep) if guidance is not None else contextlib.nullcontext()
    with ctx:
        out = objective(net, x, batch, "train", keep=keep)
    loss = out.loss
    if guidance is not None:
        extra, _ = guidance.losses(rel, out.ids_keep)
        loss = loss if extra is None else loss + extra
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


# ------------------------------------------------------------------------------------------------ off switches
def test_inert_modes_are_bit_identical_to_the_baseline():
    x, y, rel = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 0]), corner_relevance()
    base = vit()
    net = copy.deepcopy(base)
    obj = SupervisedObjective()
    obj.setup(net)
    guidance = Guidance(net, {
        "attention": SiftGuidance(net, weight=0.0), "interrelation": PatchInterrelation(net, weight=0.0),
        "background": BackgroundSuppression(net, weight=0.0), "prior": AttentionPrior(net, beta=0.0),
        "token_drop": TokenDrop(net, keep=1.0),
    })
    assert not guidance.active and not guidance.needs_relevance("train")
    for _ in range(2):
        a = step(base, None, obj, x, y, rel)
        b = step(net, guidance, obj, x, y, rel)
        assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), net.parameters()))
    # the global weight 0 silences active loss modes too
    g0 = Guidance(net, {"attention": SiftGuidance(net, weight=1.0)}, weight=0.0)
    assert not g0.active


def test_mae_without_relevance_consumers_is_unchanged():
    x = torch.rand(2, 1, 32, 32)
    outs = []
    for weighting in (None, KeypointReconWeight()):
        net = vit()
        obj = MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
        obj.setup(net)
        if weighting is not None:
            weighting.bind(obj)
        torch.manual_seed(1)
        # uniform relevance: KAMIM weights are all 1, the loss is plain MAE's
        outs.append(obj(net, x, {"relevance": torch.full((2, 4, 4), 1 / 16)}, "train").loss)
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------ token drop
def test_token_drop_shortens_the_sequence_and_keeps_the_most_relevant():
    net = vit()
    drop = TokenDrop(net, keep=0.25)
    rel = corner_relevance()
    ids = drop.select(rel, step=0)
    assert ids.shape == (4, 4) and (ids == torch.tensor([0, 1, 4, 5])).all()
    obj = SupervisedObjective()
    obj.setup(net)
    guide = SiftGuidance(net, layers=[0, 1])
    with guide.capture():
        out = obj(net, torch.rand(4, 1, 32, 32), {"label": torch.zeros(4, dtype=torch.long)}, "train", keep=ids)
    assert all(m.shape[-1] == 1 + 4 for m in guide._capture.maps.values())  # CLS + 4 of 16 patches
    assert torch.equal(out.ids_keep, ids)
    assert torch.isfinite(guide.loss(rel, ids_keep=ids))
    # a random share: 4 kept, 2 of them random, the 2 top ones always in
    ids = select_tokens(rel, 4, 2, torch.Generator().manual_seed(0))
    assert ids.shape == (4, 4) and all(len(set(r.tolist()) & {0, 1, 4, 5}) >= 2 for r in ids)
    # full sequence after full_after * total_steps
    late = TokenDrop(net, keep=0.5, full_after=0.5, total_steps=10)
    assert late.select(rel, step=4) is not None and late.select(rel, step=5) is None


@pytest.mark.parametrize("kw", [dict(keep=0.0), dict(keep=1.5), dict(random_share=-0.1), dict(full_after=0.5)])
def test_token_drop_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        TokenDrop(vit(), **kw)


def test_random_control_drops_at_random():
    src = RelevanceSource("random", seed=0)
    imgs = torch.rand(8, 1, 32, 32)
    a, b = src(imgs, 8), src(imgs, 8)
    assert not torch.equal(a, b)  # fresh noise every batch
    ids = select_tokens(a, 4)
    assert len({tuple(r.tolist()) for r in ids}) > 1  # different images keep different patches


# ------------------------------------------------------------------------------------------------ masking
def test_keypoint_masking_hides_relevant_patches_more_than_random():
    torch.manual_seed(0)
    img = blob_image(64, center=(12.0, 12.0), sigma=3.0, batch=64)  # keypoints in the top-left patches
    rel = RelevanceSource("sift")(img, 16)  # (64, 4, 4)
    rich = rel.flatten(1) > 0
    assert rich.any(1).all() and (~rich).any(1).all()
    _, guided = guided_masking(rel, keep=4, alpha=3.0, hint=0.0)
    _, rand = guided_masking(rel, keep=4, alpha=0.0, hint=0.0)
    hidden = lambda m: (m.bool() & rich).sum() / rich.sum()  # noqa: E731
    assert hidden(guided) > 0.95 and hidden(rand) < 0.9, (hidden(guided), hidden(rand))
    assert (guided.sum(1) == 12).all() and (rand.sum(1) == 12).all()
    # hints reveal some of the relevant patches, the masked count stays the same
    _, hinted = guided_masking(rel, keep=4, alpha=3.0, hint=0.5)
    assert hidden(hinted) < hidden(guided) and (hinted.sum(1) == 12).all()
    m = KeypointMasking(alpha=2.0, curriculum_steps=100)
    m.set_step(25)
    assert m.current_alpha() == pytest.approx(0.5)


def test_masking_is_used_by_mae_in_training_only():
    net = vit()
    obj = MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    obj.setup(net)
    KeypointMasking(alpha=50.0, hint=0.0).bind(obj)
    rel = corner_relevance(2)
    batch = {"relevance": rel}
    ids = obj(net, torch.rand(2, 1, 32, 32), batch, "train").ids_keep
    assert not (ids.unsqueeze(-1) == torch.tensor([0, 1, 4, 5])).any()  # relevant patches all masked
    torch.manual_seed(0)
    val = obj(net, torch.rand(2, 1, 32, 32), batch, "val").ids_keep
    assert val.shape == ids.shape  # random masks at validation, whatever the relevance


# ------------------------------------------------------------------------------------------------ recon weight
def test_keypoint_weights_follow_kamim():
    rel = corner_relevance(1, rich=(0,))
    w = keypoint_weights(rel, temperature=0.25)
    assert w.min() == 1.0 and w[0, 0] == pytest.approx(torch.e**4)
    uni = keypoint_weights(torch.full((2, 4, 4), 1 / 16))
    assert torch.equal(uni, torch.ones(2, 16))
    per_patch, mask = torch.rand(2, 16), (torch.rand(2, 16) > 0.5).float()
    assert torch.equal(weighted_patch_loss(per_patch, mask, uni), weighted_patch_loss(per_patch, mask))
    assert weighted_patch_loss(per_patch, mask, uni, "weight") == pytest.approx(float(weighted_patch_loss(per_patch, mask)))


# ------------------------------------------------------------------------------------------------ prior
def test_prior_shifts_attention_toward_relevant_patches():
    net = vit().eval()
    x = torch.rand(2, 1, 32, 32)
    rel = corner_relevance(2)
    guide = SiftGuidance(net, layers=[-1])
    prior = AttentionPrior(net, layers=[-1], beta=2.0)

    def mass():
        with torch.no_grad(), guide.capture():
            net(x)
        a = guide.patch_attention()[1]
        guide.clear()
        return a[:, [0, 1, 4, 5]].sum(1)

    before = mass()
    with prior.apply(rel, step=0):
        after = mass()
    assert (after > before + 0.2).all(), (before, after)
    with prior.apply(torch.full((2, 4, 4), 1 / 16), step=0):  # uniform relevance: no change (bias 0 everywhere
        same = mass()                                          # but log(1 + eps), constant over patches)
    # a constant bias on patches but not on CLS shifts mass between CLS and patches only; the patch distribution
    # (renormalised) is unchanged
    torch.testing.assert_close(same, before, rtol=1e-4, atol=1e-5)
    assert torch.equal(mass(), before)  # outside the context the model is untouched


def test_prior_schedule_decays_and_is_off_at_eval():
    net = vit()
    prior = AttentionPrior(net, beta=1.0, schedule=dict(kind="cosine", total_steps=10))
    assert prior.current_beta(0) == 1.0 and prior.current_beta(10) == pytest.approx(0.0)
    assert prior.needs_relevance("train") and not prior.needs_relevance("val")
    assert AttentionPrior(net, at_eval=True).needs_relevance("val")


def test_prior_decays_over_a_fraction_of_the_run_from_the_config(tiny_cfg):
    from hydra.utils import instantiate

    cfg = tiny_cfg(["guidance=prior", "trainer.max_steps=300", "guidance.prior.schedule.fraction=0.5"])
    prior = instantiate(cfg.guidance.prior)(vit())
    assert prior.current_beta(75) == pytest.approx(0.5) and prior.current_beta(150) == 0.0
    assert instantiate(tiny_cfg(["guidance=prior", "trainer.max_steps=300"], name="full").guidance.prior)(
        vit()).current_beta(150) == pytest.approx(0.5)  # default: over the whole run


# ------------------------------------------------------------------------------------------------ interrelation
def test_interrelation_target_and_gradients():
    rel = corner_relevance(2)
    t = interrelation_target(rel, (4, 4), sigma=1.0)
    torch.testing.assert_close(t.sum(-1), torch.ones(2, 16))
    assert t[:, :, [0, 1, 4, 5]].sum(-1).min() > 0.99  # every query looks at the relevant corner
    uni = interrelation_target(torch.full((1, 4, 4), 1 / 16), (4, 4), sigma=1.0)
    assert uni[0, 0, 1] > uni[0, 0, 15]  # uniform relevance: the locality kernel alone
    net = vit()
    mode = PatchInterrelation(net, layers=[0], sigma=1.0)
    with mode.capture():
        net(torch.rand(2, 1, 32, 32))
    loss = mode.loss(rel, step=0)
    loss.backward()
    assert loss > 0 and net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert net.blocks[1].attn.qkv.weight.grad is None or net.blocks[1].attn.qkv.weight.grad.abs().sum() == 0


# ------------------------------------------------------------------------------------------------ background
def test_background_penalises_only_keypoint_free_patches():
    net = vit()
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


def test_attention_mode_per_head_and_early_layers():
    net = vit(depth=3)
    guide = SiftGuidance(net, layers=[0, 1], heads=[1], head_reduce="each")
    with guide.capture():
        net(torch.rand(2, 1, 32, 32))
    assert guide.layers == [0, 1]
    loss = guide.loss(corner_relevance(2), step=0)
    loss.backward()
    assert torch.isfinite(loss) and net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert net.blocks[2].attn.qkv.weight.grad is None


# ------------------------------------------------------------------------------------------------ controls
def test_controls_use_the_wrong_map():
    img = torch.cat([blob_image(32, center=(4.0, 4.0)), blob_image(32, center=(27.0, 27.0))])
    own = RelevanceSource("sift")(img, 8)
    rolled = RelevanceSource("rolled")(img, 8)
    assert not torch.equal(rolled, own) and torch.equal(rolled, roll_relevance(own))
    torch.testing.assert_close(rolled.flatten(1).sort(1).values, own.flatten(1).sort(1).values)  # same values
    shuffled = RelevanceSource("shuffled")(img, 8)
    assert torch.equal(shuffled, own.roll(1, 0))  # B = 2: the other image's map
    fg = foreground_relevance(img, 8)
    assert fg[0].argmax() == 0 and fg[1].argmax() == 15  # the blob's patch
    src = RelevanceSource("mean", mean_images=4)

    class DM:  # a datamodule with in-memory training images
        class train_set:
            images = (img * 255).to(torch.uint8)

    from siftguide.data import DeviceTransform

    src.setup(DM, DeviceTransform(32, crop_scale=None, hflip=False), 8)
    mean = src(img, 8)
    assert torch.equal(mean[0], mean[1])  # the same map for every image
    torch.testing.assert_close(mean[0], own.mean(0), atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ errors
def test_modes_an_objective_cannot_serve_are_errors():
    net = vit()
    sup, mae = SupervisedObjective(), MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="objective=mae"):
        Guidance(net, {"masking": KeypointMasking()}).bind(sup)
    with pytest.raises(ValueError, match="objective=mae"):
        Guidance(net, {"recon_weight": KeypointReconWeight()}).bind(sup)
    with pytest.raises(ValueError, match="token_drop cannot serve"):
        Guidance(net, {"token_drop": TokenDrop(net)}).bind(mae)
    with pytest.raises(ValueError, match="out of range"):
        SiftGuidance(net, layers=[5])
    with pytest.raises(ValueError, match="out of range"):
        PatchInterrelation(net, heads=[7])
    with pytest.raises(ValueError, match="unknown relevance kind"):
        RelevanceSource("nope")
    with pytest.raises(ValueError, match="beta"):
        AttentionPrior(net, beta=-1)


# ------------------------------------------------------------------------------------------------ names
def test_mode_files_are_named_as_their_configs_and_old_paths_still_work():
    """file = config name for every mode; siftguide.guidance.alignment / .recon (the former files) stay importable."""
    import importlib

    import yaml

    from siftguide import SiftGuidance as top
    from siftguide.guidance.alignment import SiftGuidance as old_attention, divergence as old_divergence
    from siftguide.guidance.recon import KeypointReconWeight as old_recon, keypoint_weights as old_weights
    from siftguide.objectives import MAEObjective as mae, encode  # noqa: F401 - the stable public API
    from tests.conftest import ROOT

    assert old_attention is top is SiftGuidance and old_recon is KeypointReconWeight
    assert old_divergence is importlib.import_module("siftguide.guidance.attention").divergence
    assert old_weights is keypoint_weights and mae is MAEObjective
    for cfg in sorted((ROOT / "configs" / "guidance").glob("*.yaml")):
        node = {k: v for k, v in yaml.safe_load(cfg.read_text()).items() if isinstance(v, dict)}
        for name, mode in node.items():  # every mode node: guidance.<name> -> siftguide/guidance/<name>.py
            cls = getattr(importlib.import_module("siftguide.guidance"), mode["_target_"].rsplit(".", 1)[1])
            assert cls.__module__ == f"siftguide.guidance.{name}" and cls.name == name, (cfg.name, cls)
