"""The examples run as documented."""
import math

from examples import lightning_module, plain_pytorch


def test_plain_pytorch_example():
    """Three guided steps: a positive guidance term each step, and after detach() the model carries nothing of the
    plugin (no hook left, fused attention restored)."""
    out = plain_pytorch.main(["--steps", "3"])
    assert len(out["guidance"]) == 3 and all(math.isfinite(t) for t in out["task"])
    assert all(0 < g < 0.3 * math.log(64) for g in out["guidance"])  # weight 0.3 x KL over 64 patches (< log 64)
    last = out["model"].blocks[-1].attn
    assert not last.attn_drop._forward_pre_hooks and last.fused_attn == out["model"].blocks[0].attn.fused_attn


def test_lightning_module_example():
    m = lightning_module.main(["--steps", "3"])
    assert m["guidance"] > 0 and math.isfinite(m["task"])


def test_plugin_modes_example():
    from examples import plugin_modes

    m = plugin_modes.main(["--steps", "2"])
    assert m["kept"] == 32 and math.isfinite(m["task"]) and math.isfinite(m["mae"])
