"""The set-up owner of the relevance stage: keypoint caches, the dataset-mean map, datasets that carry their
keypoints, and the prefetcher.

:class:`RelevanceSetup` runs once, when a fit (or a validation or test) starts and an active guidance mode (or the
pipeline's guided crops, ``transform.guided_crops``) reads the relevance: it calls
:meth:`~siftguide.relevance.RelevanceStage.setup` with the datamodule's datasets and the data
pipeline's deterministic resize (``module.transform.resize``, so the images are resized in one place), wraps a
dataset of files whose keypoints now live in an on-disk cache
(:class:`~siftguide.relevance.folder_cache.WithKeypoints`: its batches carry their keypoints), and, where keypoints
are detected on the fly on a GPU, makes the training loader a :class:`~siftguide.relevance.prefetch.DevicePrefetcher`
(the next batch's keypoints are detected on a side stream while the current step runs). The module and the stage
change no datamodule; this callback is the one place that does.
"""
from __future__ import annotations

import os

import lightning as L
import torch

from ..relevance.folder_cache import WithKeypoints
from ..relevance.prefetch import DevicePrefetcher, attach

__all__ = ["RelevanceSetup"]

_SETS = {"train": "train_set", "val": "val_set"}


def needs_relevance(module, stage: str) -> bool:
    """Whether ``stage`` reads the relevance: an active guidance mode, or the data pipeline's guided crops."""
    return module.guidance.needs_relevance(stage) or module.transform.needs_relevance(stage)


class RelevanceSetup(L.Callback):
    """Sets up ``pl_module.relevance`` for the datamodule (see the module docstring)."""

    def __init__(self) -> None:
        self.done = False

    def setup_relevance(self, trainer: L.Trainer, module) -> None:
        if self.done or not any(needs_relevance(module, s) for s in ("train", "val", "test")):
            return
        dm = trainer.datamodule
        datasets = {stage: getattr(dm, attr, None) for stage, attr in _SETS.items()}
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)  # a cache build (minutes on a CPU) is not training: every core
        try:
            made = module.relevance.setup(
                datasets, module.transform.resize, module.transform.size, module.patch_size, module.device,
                batch_size=int(getattr(dm, "batch_size", 256) or 256),
                num_workers=int(getattr(dm, "num_workers", 0) or 0))
        finally:
            torch.set_num_threads(threads)
        for stage, cache in made.items():
            setattr(dm, _SETS[stage], WithKeypoints(datasets[stage], cache))
        self.done = True

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        self.setup_relevance(trainer, pl_module)
        if needs_relevance(pl_module, "train") and pl_module.relevance.prefetching(pl_module.device):
            attach(trainer.datamodule, lambda loader: DevicePrefetcher(loader, self.prefetch(pl_module),
                                                                       pl_module.device))

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        self.setup_relevance(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module) -> None:
        self.setup_relevance(trainer, pl_module)

    @staticmethod
    def prefetch(module):
        """The work done one batch ahead: the deterministic resize and the keypoints of the un-augmented images
        (no random draw, so the run's random streams and its exact resume are unchanged)."""
        @torch.no_grad()
        def prepare(batch: dict) -> dict:
            batch = dict(batch)
            if batch["image"].shape[0]:
                batch["image"] = module.transform.resize(batch["image"])
                batch["keypoints"], batch["keypoint_count"] = module.relevance.batch_keypoints(batch["image"])
            return batch

        return prepare
