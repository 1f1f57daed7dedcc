"""siftguide.callbacks.attention_divergence: val/attn_div is the KL from the images' SIFT relevance to the attention of
the module's own evaluation forward, on the first batches only, reduced across ranks; the model is left fused."""
from types import SimpleNamespace

import torch

from siftguide.callbacks import AttentionDivergence
from siftguide.guidance import AttentionAlignment
from siftguide.train import build_module


def test_val_attn_div_measures_the_evaluation_forward(tiny_cfg):
    module = build_module(tiny_cfg(["guidance=none"]))  # baselines log it too
    calls = {}
    module.log = lambda name, value, **kw: calls.setdefault(name, []).append((value, kw))
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=g),
             "label": torch.arange(4), "index": torch.arange(4)}
    module.eval()
    cb, trainer = AttentionDivergence(batches=1, layers=[-1]), SimpleNamespace(sanity_checking=False)
    ref = AttentionAlignment(module.net, layers=[-1], weight=0.0)
    with torch.no_grad():
        for idx in range(2):
            b = module.on_after_batch_transfer(batch, 0)
            cb.on_validation_batch_start(trainer, module, b, idx)
            out = module.validation_step(b, idx)
            cb.on_validation_batch_end(trainer, module, out, b, idx)
        with ref.capture(force=True):  # the same forward, measured by hand
            module.net(module.transform.normalize(b["image"]))
        rel, _ = module.relevance.sift_relevance(b["image"], module.patch_size)
        expected = ref.divergence_value(rel)
    ((value, kw),) = calls["val/attn_div"]  # batch 1 is not measured
    torch.testing.assert_close(value, expected)
    assert kw["sync_dist"] and float(value) > 0
    assert all(blk.attn.fused_attn for blk in module.net.blocks)  # explicit attention only while measuring
