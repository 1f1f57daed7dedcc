"""siftguide.objectives.mae: masking and patchify shapes, the loss and the online probe, guidance on the visible
tokens, the sin-cos position embedding (timm's)."""
import pytest
import torch

from siftguide import AttentionAlignment
from siftguide.guidance import visible_relevance
from siftguide.objectives.mae import MAEObjective, patchify, random_masking, sincos_pos_embed

ENCODER = dict(num_classes=10, embed_dim=192, num_heads=3)  # the tiny ViT at vit_tiny's own width and heads


def test_masking_and_patchify_shapes():
    ids, mask = random_masking(3, 16, 4, torch.device("cpu"))
    assert ids.shape == (3, 4) and mask.shape == (3, 16)
    assert (mask.sum(1) == 12).all() and (mask.gather(1, ids) == 0).all()
    assert (ids[:, 1:] > ids[:, :-1]).all()  # sorted, distinct
    x = torch.arange(2 * 1 * 4 * 4).float().view(2, 1, 4, 4)
    p = patchify(x, (2, 2))
    assert p.shape == (2, 4, 4) and p[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert sincos_pos_embed(16, (2, 3)).shape == (6, 16)


def test_mae_loss_probe_and_visible_guidance(tiny_vit):
    net = tiny_vit(**ENCODER)
    obj = MAEObjective(mask_ratio=0.75, decoder_dim=32, decoder_depth=1, decoder_heads=2, num_classes=10)
    obj.setup(net)
    guide = AttentionAlignment(net, layers=[-1], weight=1.0)
    x = torch.rand(4, 1, 32, 32)
    batch = {"label": torch.tensor([0, 1, 2, 3])}
    with guide.capture():
        out = obj(net, x, batch)
    assert out.ids_keep.shape == (4, 4)  # 16 patches, 25 % visible
    assert out.logits.shape == (4, 10) and torch.isfinite(out.loss)
    # the captured attention covers prefix + visible tokens; the relevance is restricted to them
    assert guide._capture.maps[1].shape[-1] == 1 + 4
    rel = torch.rand(4, 4, 4)
    rel = rel / rel.flatten(1).sum(1).view(4, 1, 1)
    cls = guide._capture.maps[1][:, :, 0, 1:].float().mean(1)  # class token -> the 4 visible patches, heads averaged
    cls = cls / cls.sum(-1, keepdim=True)
    r = visible_relevance(rel, out.ids_keep)  # the relevance of the visible patches, renormalised
    expected = (torch.xlogy(r, r) - r * torch.log(cls + 1e-8)).sum(-1).mean()
    torch.testing.assert_close(guide.loss(rel, 0, ids_keep=out.ids_keep), expected)


def test_probe_does_not_backpropagate_into_the_encoder(tiny_vit):
    net = tiny_vit(**ENCODER)
    obj = MAEObjective(decoder_dim=32, decoder_depth=1, decoder_heads=2, num_classes=10)
    obj.setup(net)
    out = obj(net, torch.rand(4, 1, 32, 32), {"label": torch.tensor([0, 1, 2, 3])})
    out.logits.sum().backward()  # the probe reads detached features
    assert obj.probe.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_unlabelled_batches_do_not_train_the_probe(tiny_vit):
    net = tiny_vit(**ENCODER)
    obj = MAEObjective(decoder_dim=32, decoder_depth=1, decoder_heads=2, num_classes=10)
    obj.setup(net)
    out = obj(net, torch.rand(2, 1, 32, 32), {"label": torch.tensor([-1, -1])})
    assert float(out.metrics["probe_loss"]) == 0.0 and torch.isfinite(out.loss)


def test_eval_forward_captures_the_masked_pass(tiny_vit):
    net = tiny_vit(**ENCODER).eval()
    obj = MAEObjective(decoder_dim=32, decoder_depth=1, decoder_heads=2, num_classes=10)
    obj.setup(net)
    guide = AttentionAlignment(net, layers=[-1])
    with torch.no_grad(), guide.capture():
        out = obj(net, torch.rand(2, 1, 32, 32), {"label": torch.tensor([0, 1])}, "val")
    rel = torch.full((2, 4, 4), 1 / 16)
    assert torch.isfinite(guide.divergence_value(rel, out.ids_keep))


@pytest.mark.parametrize("dim, grid", [(128, (8, 8)), (64, (4, 7)), (16, (14, 14)), (4, (1, 3))])
def test_sincos_pos_embed_is_timms_in_the_former_layout(dim, grid):
    """sincos_pos_embed comes from timm.layers.build_sincos2d_pos_embed; bit for bit the former hand-written one."""
    def former(dim, grid):
        yy, xx = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32),
                                torch.arange(grid[1], dtype=torch.float32), indexing="ij")
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))

        def emb(pos):
            out = pos.reshape(-1, 1) * omega.reshape(1, -1)
            return torch.cat([out.sin(), out.cos()], dim=1)

        return torch.cat([emb(yy), emb(xx)], dim=1)

    assert torch.equal(sincos_pos_embed(dim, grid), former(dim, grid))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(6, grid)
