"""siftguide.attention: the probabilities captured in a guided block equal the block's own computation; only the
guided blocks leave the fused SDPA path."""
import torch
import torch.nn.functional as F

from siftguide import AttentionAlignment
from siftguide.attention import AttentionCapture

VIT_TINY = dict(in_chans=3, num_classes=5, embed_dim=192, num_heads=3)  # vit_tiny's own width and heads, RGB


def test_captured_probabilities_equal_the_blocks_own_computation(tiny_vit):
    model = tiny_vit(depth=3, **VIT_TINY).eval()
    attn = model.blocks[-1].attn
    seen = {}
    attn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    cap = AttentionCapture(model, [-1])
    x = torch.rand(2, 3, 32, 32)
    with cap.capture():
        model(x)
    t = seen["x"]
    b, n, c = t.shape
    q, k, _ = attn.qkv(t).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    expected = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    torch.testing.assert_close(cap.maps[2], expected, atol=1e-6, rtol=1e-5)


def test_only_guided_blocks_leave_sdpa(monkeypatch, tiny_vit):
    model = tiny_vit(depth=4, **VIT_TINY).eval()
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    guide = AttentionAlignment(model, layers=[0, -1])
    x = torch.rand(1, 3, 32, 32)
    with guide.capture():
        model(x)
    assert len(calls) == 2  # blocks 1 and 2 stay fused
    calls.clear()
    model(x)
    assert len(calls) == 4 and all(b.attn.fused_attn for b in model.blocks)
