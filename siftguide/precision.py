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

__all__ = ["fp32_region", "fp32_math"]

_DEVICE_TYPES = ("cpu", "cuda")


@contextlib.contextmanager
def fp32_region() -> Iterator[None]:
    """Context manager (and decorator) disabling autocast on CPU and CUDA inside; a no-op where it is off."""
    with contextlib.ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


# (backend, operator) pairs whose fp32 inputs may be computed in reduced precision (TF32 on NVIDIA GPUs, bf16 in
# oneDNN on CPUs): ``torch.set_float32_matmul_precision("high" | "medium")``, which many training scripts call,
# switches them. torch >= 2.9 exposes each as ``torch.backends.<backend>.<operator>.fp32_precision``.
_REDUCIBLE = (("cuda", "matmul"), ("mkldnn", "matmul"), ("cudnn", "conv"))


def _precision_flags() -> list:
    flags = []
    for backend, op in _REDUCIBLE:
        obj = getattr(getattr(torch.backends, backend, None), op, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            flags.append(obj)
    return flags


@contextlib.contextmanager
def fp32_math() -> Iterator[None]:
    """:func:`fp32_region`, and fp32 matmuls and convolutions computed in full fp32 ("ieee") whatever the global
    setting (TF32 / bf16 allowed by ``torch.set_float32_matmul_precision``), restored on exit.

    For code whose fidelity needs every bit of fp32: SIFT's Gaussian pyramid in TF32 agrees with OpenCV at rho
    0.82 instead of 1.0 (``python bench/sift.py``). ``autocast(enabled=False)`` alone does not prevent TF32. Flags are set through
    the per-operator API of torch >= 2.9 (mixing it with the legacy ``allow_tf32`` flags is an error there);
    older torch uses ``set_float32_matmul_precision`` and ``cudnn.allow_tf32``.
    """
    flags = _precision_flags()
    if flags:
        saved = [f.fp32_precision for f in flags]
        for f in flags:
            f.fp32_precision = "ieee"
    else:  # torch < 2.9
        saved = [torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32]
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    try:
        with fp32_region():
            yield
    finally:
        if flags:
            for f, v in zip(flags, saved):
                f.fp32_precision = v
        else:
            torch.set_float32_matmul_precision(saved[0])
            torch.backends.cudnn.allow_tf32 = saved[1]
