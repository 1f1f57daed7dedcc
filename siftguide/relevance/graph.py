"""Run a static-shape, sync-free tensor function as a CUDA graph: one replay instead of ~1,000 kernel launches.

The detector (and the keypoints -> relevance maps after it) has no host synchronisation and no shape that depends on
the data, so one call can be recorded once per input shape and replayed (``torch.cuda.CUDAGraph``): the host then
launches a single graph per batch instead of every small kernel, which is what bounds SIFT on a GPU.

:class:`Captured` wraps such a function: ``backend="graph"`` records it on CUDA (eager on other devices),
``"compile"`` uses ``torch.compile(mode="reduce-overhead")`` (inductor-fused kernels in CUDA graphs; plain
``torch.compile`` on CPU), ``"eager"`` calls it as is, ``"auto"`` is ``graph`` on CUDA and ``eager`` elsewhere.
Outputs are copied out of the graph's static buffers (they are overwritten by the next replay, possibly while the
previous batch's backward still needs them).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)

__all__ = ["Captured", "BACKENDS"]

BACKENDS = ("auto", "eager", "graph", "compile")


def _clone(x):
    return x.clone() if isinstance(x, Tensor) else x


class Captured:
    """``fn(x) -> tensors`` (any pytree of tensors), replayed from a CUDA graph per input shape.

    Args:
        fn: the function; pure (same input, same output), no host sync, no data-dependent shape, no CPU -> GPU
            copy in the call (device constants cached on the first, eager, call). Its outputs must be tensors (or
            tuples / lists / dicts of them): those are copied out of the graph's static memory; any other object
            would alias it.
        backend: ``auto`` | ``eager`` | ``graph`` | ``compile`` (see the module docstring).
        warmup: eager calls on a side stream before recording (allocator and caches settle), per shape.
        max_graphs: shapes recorded at most (a graph holds its own memory); further shapes run eagerly.

    A shape is recorded at its second call: a one-off shape (the last, smaller batch of a validation pass) runs
    eagerly and costs no recording.
    """

    def __init__(self, fn: Callable, backend: str = "auto", warmup: int = 2, max_graphs: int = 4) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown detector backend {backend!r}; expected one of {BACKENDS}")
        self.fn, self.backend, self.warmup, self.max_graphs = fn, backend, warmup, max_graphs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, object]] = {}
        self._seen: set[tuple] = set()
        self._compiled: Callable | None = None
        self._pool = None

    def mode(self, device: torch.device) -> str:
        """The backend used on ``device``: ``graph`` and ``auto`` mean eager off CUDA."""
        if self.backend == "compile":
            return "compile"
        if self.backend in ("graph", "auto") and device.type == "cuda":
            return "graph"
        return "eager"

    def __call__(self, x: Tensor):
        mode = self.mode(x.device)
        if mode == "eager":
            return self.fn(x)
        if mode == "compile":
            key = (tuple(x.shape), x.dtype, x.device)
            if key not in self._seen:  # a shape's first call: eager (it fills the detector's device constants, which
                self._seen.add(key)    # the compiled graph then takes as inputs; a one-off shape compiles nothing)
                return self.fn(x)
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=False,
                                               mode="reduce-overhead" if x.device.type == "cuda" else None)
            return tree_map(_clone, self._compiled(x))
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen or len(self._graphs) >= self.max_graphs:
                self._seen.add(key)
                return self.fn(x)
            entry = self._graphs[key] = self._record(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return tree_map(_clone, static_out)

    def _record(self, x: Tensor):
        with torch.inference_mode(False):  # recorded during validation, replayed in training: a normal tensor
            static_in = x.detach().clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: CUDA calls of other threads (the DataLoader's pin-memory thread allocating pinned memory)
        # may go on during the capture; in the default global mode they would fail it
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self.fn(static_in)
        log.info("relevance: recorded a CUDA graph of the detector for input %s", tuple(x.shape))
        return graph, static_in, static_out

    def __repr__(self) -> str:
        return f"Captured({getattr(self.fn, '__name__', self.fn)}, backend={self.backend})"
