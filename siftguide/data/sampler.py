"""A training-order sampler that resumes exactly: the data order is a function of the run's seed and of how many
training batches the run has consumed, nothing else.

Epoch ``e`` visits the samples in the order of a permutation seeded by ``(seed, e)`` (a private generator: the
global RNG is not touched, so augmentation draws do not depend on when loaders are created). When Lightning creates
the iterator it reads the batches already consumed, ``b`` (the fit loop's restored progress after a resume), and
starts at batch ``b mod batches_per_epoch`` of epoch ``b div batches_per_epoch``: a run killed mid-epoch and
resumed sees the same remaining batches in the same order as the uninterrupted run. Like ``DistributedSampler``
(which it subclasses, so Lightning does not wrap it under DDP) each rank takes every ``world``-th index of the
permutation; batches are full (``drop_last``) so an epoch is ``num_samples // batch_size`` batches per rank.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ResumableSampler", "train_order"]


class ResumableSampler(DistributedSampler):
    """Args:
        dataset: the training set (only its length is used).
        batch_size: the loader's batch size (per rank), to turn consumed batches into a position.
        seed: of the per-epoch permutations.
        position: returns the training batches consumed so far (called when an epoch's iterator is created;
            ``None``: always 0, i.e. epoch 0 from the start).
        num_replicas / rank: data-parallel world size and this process's rank.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, position: Callable[[], int] | None = None,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.batches_per_epoch = self.num_samples // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"the training set has {len(dataset)} samples ({self.num_samples} per rank), fewer than "
                             f"one batch of {batch_size}: lower data.batch_size or use more training images")
        self.position = position or (lambda: 0)

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the epoch follows from the consumed batches (Lightning's epoch counter restarts at a
        resumed run's end-of-fit checkpoint, the data order must not)."""

    def permutation(self, epoch: int) -> list[int]:
        """This rank's indices of epoch ``epoch`` (``num_samples`` of them)."""
        entropy = [int(self.seed) % 2**63, int(epoch)]
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1)
        idx = torch.randperm(len(self.dataset), generator=g).tolist()
        idx += idx[: self.total_size - len(idx)]  # pad to a multiple of the world size (as DistributedSampler)
        return idx[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        epoch, batch = divmod(int(self.position()), self.batches_per_epoch)
        self.epoch = epoch
        return iter(self.permutation(epoch)[batch * self.batch_size :])


def train_order(datamodule, dataset: Dataset, batch_size: int) -> dict:
    """``DataLoader`` keyword arguments of a DataModule's training loader: a :class:`ResumableSampler` seeded by
    the run's seed (``torch.initial_seed()``, set by ``seed_everything``), positioned by the attached trainer's
    consumed training batches, one shard per rank; and the loader's own generator (worker seeds), so that creating
    an iterator draws nothing from the global RNG."""
    trainer = getattr(datamodule, "trainer", None)

    def position() -> int:
        if trainer is None or getattr(trainer, "fit_loop", None) is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    seed = torch.initial_seed()
    sampler = ResumableSampler(dataset, batch_size, seed=seed, position=position, num_replicas=world, rank=rank)
    return {"sampler": sampler, "generator": torch.Generator().manual_seed(seed)}
