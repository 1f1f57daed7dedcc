"""The examples run as documented."""
import math

from examples import lightning_module, plain_pytorch


def test_plain_pytorch_example():
    g = plain_pytorch.main(["--steps", "3"])
    assert math.isfinite(g) and g > 0


def test_lightning_module_example():
    m = lightning_module.main(["--steps", "3"])
    assert m["guidance"] > 0 and math.isfinite(m["task"])


def test_plugin_modes_example():
    from examples import plugin_modes

    m = plugin_modes.main(["--steps", "2"])
    assert m["kept"] == 32 and math.isfinite(m["task"]) and math.isfinite(m["mae"])
