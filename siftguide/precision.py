"""fp32 regions under mixed precision (``trainer.precision=bf16-mixed`` / ``16-mixed``).

SIFT detection, relevance maps and the guidance divergences are small, numerically delicate computations
(differences of Gaussians, logarithms of attention probabilities near 0, normalised distributions): under
autocast their matmuls, convolutions and einsums would run in bf16 (8 bits of mantissa) and the maps would no
longer sum to 1. :func:`fp32_region` switches autocast off for the device types where it is on; the code inside
casts its inputs to float, so it computes in fp32 whatever the surrounding precision. It is cheap: these regions
cost a small fraction of the step.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["fp32_region"]

_DEVICE_TYPES = ("cpu", "cuda")


@contextlib.contextmanager
def fp32_region() -> Iterator[None]:
    """Context manager (and decorator) disabling autocast on CPU and CUDA inside; a no-op where it is off."""
    with contextlib.ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield
