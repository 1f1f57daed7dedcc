"""Detect the next batch's keypoints while the current step runs: a side CUDA stream in the data pipeline.

On a GPU the detector's kernels are small; run beside the training step's large ones on a second stream, they fill
the SMs the step leaves idle instead of adding to the step's time. :class:`DevicePrefetcher` wraps the training
loader: when batch ``t`` is handed to the training loop, batch ``t + 1`` has already been moved to the device and
its keypoints detected on a side stream (the un-augmented image, resized like the device pipeline does; a CUDA graph
replay). The main stream waits for that work with an event (no host sync), and the batch's tensors are recorded on
the main stream so the allocator does not reuse them early. The step then maps the keypoints through its own
augmentation matrix, as with the keypoint cache: no random draw happens ahead of time, so the run's random streams,
and its exact resume, are the same as without prefetch.

Off CUDA (``relevance.prefetch=true`` on a CPU, for tests) the same work runs synchronously, one batch ahead.
:func:`attach` installs it on a datamodule's ``train_dataloader``.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["DevicePrefetcher", "attach"]


class DevicePrefetcher:
    """Iterable over ``loader``'s batches, each prepared one batch ahead by ``prepare(batch_on_device) -> batch``
    on a side stream (CUDA). Length and other attributes (``sampler``, ``dataset``, ...) are the loader's."""

    def __init__(self, loader, prepare: Callable[[dict], dict], device: torch.device | str) -> None:
        self.loader, self.prepare, self.device = loader, prepare, torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name in ("loader", "prepare", "device"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def __iter__(self) -> Iterator[dict]:
        it = iter(self.loader)
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def launch():
            try:
                batch = next(it)
            except StopIteration:
                return None
            if stream is None:
                return self.prepare(self._to_device(batch)), None
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the step's earlier work on shared memory
            with torch.cuda.stream(stream):
                out = self.prepare(self._to_device(batch))
                done = torch.cuda.Event()
                done.record(stream)
            return out, done

        ahead = launch()
        while ahead is not None:
            batch, done = ahead
            if done is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(done)
                for v in batch.values():
                    if isinstance(v, Tensor) and v.is_cuda:
                        v.record_stream(main)
            ahead = launch()  # batch t + 1 is queued on the side stream before step t is launched
            yield batch


def attach(datamodule, wrap: Callable[[object], DevicePrefetcher]) -> None:
    """Make ``datamodule.train_dataloader()`` return ``wrap(loader)`` (once; the datamodule's own method stays
    the source of the loader, so its sampler and resume logic are unchanged)."""
    original = datamodule.train_dataloader
    if getattr(original, "prefetching", False):
        return

    def train_dataloader():
        return wrap(original())

    train_dataloader.prefetching = True
    datamodule.train_dataloader = train_dataloader
