"""The attention mode (AttentionAlignment) on several timm ViT variants: exact capture, gradients, no leaks, clean detach,
errors, heads and early layers, the divergences."""

import pytest
import timm
import torch

from siftguide import AttentionAlignment
from siftguide.attention import prefix_tokens, resolve_layers
from siftguide.guidance import divergence
from tests.helpers import corner_relevance


VARIANTS = {
    "cls": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8), (4, 4), 1),
    "avgpool_no_cls": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, class_token=False,
                                                    global_pool="avg"), (4, 4), 0),
    "registers": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, reg_tokens=4, no_embed_class=True),
                  (4, 4), 5),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8), (4, 4), 2),
    "non_square": ("vit_tiny_patch16_224", dict(img_size=(32, 48), patch_size=8), (4, 6), 1),
    "patch4": ("vit_tiny_patch16_224", dict(img_size=24, patch_size=4), (6, 6), 1),
    "eva_rope": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7), (4, 4), 1),
}


def make(name, kw, depth=3):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, depth=depth, num_classes=5, **kw).eval()


def images_for(grid, patch, b=2):
    return torch.rand(b, 3, grid[0] * patch, grid[1] * patch)


def random_relevance(b, grid):
    r = torch.rand(b, *grid)
    return r / r.flatten(1).sum(1).view(b, 1, 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plugin_on_variant(variant):
    name, kw, grid, n_prefix = VARIANTS[variant]
    model = make(name, kw)
    patch = model.patch_embed.patch_size[0]
    x = images_for(grid, patch)
    assert prefix_tokens(model)["num_prefix"] == n_prefix
    with torch.no_grad():
        ref = model(x)
    guide = AttentionAlignment(model, layers=[1], weight=0.5)
    assert guide.attention == ("mean" if variant == "avgpool_no_cls" else "cls")
    model.train()
    with guide.capture():
        out = model(x)
    # explicit attention in the guided block computes what fused SDPA computes
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    probs = guide._capture.maps[1]
    n = n_prefix + grid[0] * grid[1]
    assert probs.shape == (2, model.blocks[1].attn.num_heads, n, n)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    loss = guide.loss(random_relevance(2, grid), 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[2].attn.qkv.weight.grad is None  # after the guided block: not in the graph
    guide.detach()
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after, ref), "detached model must be bit-identical to the original"


def test_no_leak_across_steps_or_into_inference():
    model = make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8))
    guide = AttentionAlignment(model, layers=[-1])
    x, rel = torch.rand(2, 3, 32, 32), random_relevance(2, (4, 4))
    with guide.capture():
        model(x)
    guide.loss(rel, 0)
    with pytest.raises(RuntimeError, match="capture"):
        guide.loss(rel, 0)  # the captured attention was consumed
    with torch.no_grad():
        model.eval()(x)
    assert guide._capture.maps == {}
    assert not model.blocks[-1].attn.attn_drop._forward_pre_hooks
    with guide.capture():
        with pytest.raises(RuntimeError, match="nested"):
            with guide._capture.capture():
                pass


def test_weight_zero_is_inert():
    model = make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8))
    guide = AttentionAlignment(model, layers=[-1], weight=0.0)
    x = torch.rand(2, 3, 32, 32)
    with guide.capture():
        assert model.blocks[-1].attn.fused_attn  # no capture at all
        out = model(x)
    loss = guide.loss(random_relevance(2, (4, 4)), 0)
    assert float(loss) == 0.0 and not loss.requires_grad
    out.sum().backward()  # the model still trains normally


def test_mismatched_relevance_grid_is_a_clear_error():
    model = make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8))
    guide = AttentionAlignment(model, layers=[-1])
    with guide.capture():
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="patch grid"):
        guide.loss(random_relevance(2, (8, 8)), 0)


def test_dynamic_image_size():
    model = make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, dynamic_img_size=True))
    guide = AttentionAlignment(model, layers=[-1])
    with guide.capture():
        model(torch.rand(2, 3, 48, 24))
    loss = guide.loss(random_relevance(2, (6, 3)), 0)
    assert torch.isfinite(loss)


def test_unsupported_attention_names_the_module():
    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=64, num_heads=2)
    with pytest.raises(TypeError, match="RelPosAttention"):
        AttentionAlignment(model, layers=[-1], attention="mean")
    with pytest.raises(TypeError, match="blocks"):
        AttentionAlignment(torch.nn.Linear(2, 2))


def test_argument_errors():
    model = make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8))
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers(model, [5])
    assert resolve_layers(model, [-1, 2, 0]) == [0, 2]
    with pytest.raises(ValueError, match="divergence"):
        AttentionAlignment(model, divergence="js")
    with pytest.raises(ValueError, match=">= 0"):
        AttentionAlignment(model, weight=-1)
    no_cls = make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="class token"):
        AttentionAlignment(no_cls, attention="cls")


def test_heads_selection_changes_the_target_attention():
    model = make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8))
    x, rel = torch.rand(2, 3, 32, 32), random_relevance(2, (4, 4))
    values = []
    for heads in (None, [0], [1]):
        g = AttentionAlignment(model, layers=[-1], heads=heads)
        with g.capture():
            model(x)
        values.append(float(g.loss(rel, 0).detach()))
        g.detach()
    assert len(set(round(v, 6) for v in values)) == 3


def test_divergences_zero_at_match_and_ordered():
    a = torch.tensor([[0.5, 0.3, 0.2]])
    for kind in ("kl", "mse"):
        assert float(divergence(a, a, kind)) == pytest.approx(0.0, abs=1e-6)
    entropy = -(a * a.log()).sum()
    assert float(divergence(a, a, "ce")) == pytest.approx(float(entropy), abs=1e-5)
    far = torch.tensor([[0.05, 0.05, 0.9]])
    assert float(divergence(far, a, "kl")) > float(divergence(a * 0.9 + far * 0.1, a, "kl")) > 0


def test_attention_mode_per_head_and_early_layers(tiny_vit):
    net = tiny_vit(depth=3)
    guide = AttentionAlignment(net, layers=[0, 1], heads=[1], head_reduce="each")
    with guide.capture():
        net(torch.rand(2, 1, 32, 32))
    assert guide.layers == [0, 1]
    loss = guide.loss(corner_relevance(2), step=0)
    loss.backward()
    assert torch.isfinite(loss) and net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert net.blocks[2].attn.qkv.weight.grad is None
