"""Unreadable files over a whole run: one warning per file, the run's count, a summary at the end, and a ceiling.

The image-folder loaders drop files they cannot decode (:func:`siftguide.data.collate_skipping`) and pass their
paths on in the batch (``batch["skipped_files"]``), so that the main process warns once per file and run, whatever
the number of loader workers. :class:`SkippedFiles` is the one place that counts them:

* ``data/skipped``: training samples skipped in the whole run, resumes included (the count travels in the
  checkpoint); ``<stage>/skipped``: samples skipped per evaluation pass, summed over ranks;
* once the run has seen ``min(min_samples, one epoch)`` training samples, and at the end of training, a skipped share
  above ``data.max_skip_fraction`` stops the run with :class:`UnreadableDataError` naming the files (a folder 94 %
  unreadable would otherwise "finish", trained on a few images);
* ``max_empty_batches`` training batches in a row without a readable image stop the run (the module's step skips an
  empty batch: no loss, no weight change);
* when training ends, however it ends, a summary names the skipped files.
"""
from __future__ import annotations

import logging

import lightning as L

from ..data.datasets import WARNED, warn_unreadable
from ..run.errors import UserError

__all__ = ["SkippedFiles", "UnreadableDataError"]

log = logging.getLogger("siftguide.data")


class UnreadableDataError(UserError, RuntimeError):
    """Too many training samples were unreadable (``data.max_skip_fraction``)."""


def _names(files: dict[str, str], n: int = 10) -> str:
    shown = ", ".join(list(files)[:n])
    return shown + (f" and {len(files) - n} more" if len(files) > n else "")


class SkippedFiles(L.Callback):
    """Args:
        min_samples: training samples seen before the ceiling is checked (at most one epoch's worth).
        max_empty_batches: training batches in a row without a readable image that stop the run.
    """

    def __init__(self, min_samples: int = 256, max_empty_batches: int = 10) -> None:
        self.min_samples, self.max_empty_batches = min_samples, max_empty_batches
        self.files: dict[str, str] = {}  # path -> reason, in the order met
        self.seen = self.skipped = 0  # training samples of this process (this attempt: the ceiling's counts)
        self.total_skipped = 0  # training samples skipped in the whole run (resumes included: in the checkpoint)
        self.empty_in_row = 0
        self._summarised = False

    def state_dict(self) -> dict:
        return {"total_skipped": self.total_skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total_skipped = int(state_dict.get("total_skipped", 0))

    def on_fit_start(self, trainer, pl_module) -> None:
        WARNED.clear()  # once per file and run (tests and tools run several in one process)

    def _note(self, batch) -> int:
        found = batch.get("skipped_files") if isinstance(batch, dict) else None
        for path, reason in found or ():
            self.files.setdefault(path, reason)
            warn_unreadable(path, reason)
        return len(found or ())

    def _limit(self, trainer) -> float | None:
        limit = getattr(trainer.datamodule, "max_skip_fraction", None)
        return None if limit is None or limit >= 1.0 else float(limit)

    def _check(self, trainer, at_end: bool = False) -> None:
        limit = self._limit(trainer)
        if limit is None or self.seen == 0:
            return
        train_set = getattr(trainer.datamodule, "train_set", None)
        epoch = len(train_set) // max(1, trainer.world_size) if train_set is not None else self.min_samples
        if (at_end or self.seen >= min(self.min_samples, max(1, epoch))) and self.skipped > limit * self.seen:
            raise UnreadableDataError(
                f"{self.skipped} of the {self.seen} training samples seen ({self.skipped / self.seen:.0%}) were "
                f"unreadable, more than data.max_skip_fraction={limit:g}: the run stops rather than train on what is "
                f"left. Unreadable files ({len(self.files)}): {_names(self.files)}. Fix or remove them, or raise "
                f"data.max_skip_fraction")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not isinstance(batch, dict) or "skipped_files" not in batch:  # data without files: nothing to count
            return
        bad = self._note(batch)  # a host-side list: no device sync
        self.seen += int(batch["image"].shape[0]) + bad
        self.skipped += bad
        self.total_skipped += bad
        pl_module.log("data/skipped", float(self.total_skipped), batch_size=1)
        self.empty_in_row = self.empty_in_row + 1 if batch["image"].shape[0] == 0 else 0
        if self.empty_in_row >= self.max_empty_batches:
            raise UnreadableDataError(
                f"{self.empty_in_row} training batches in a row held no readable image: the data is mostly "
                f"unreadable (the warnings above name the files). Fix or remove them")
        self._check(trainer)

    def _eval_batch(self, pl_module, batch, stage: str) -> None:
        bad = self._note(batch)
        if isinstance(batch, dict) and "skipped_files" in batch:
            pl_module.log(f"{stage}/skipped", float(bad), reduce_fx="sum", batch_size=1, sync_dist=True)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._eval_batch(pl_module, batch, "val")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(pl_module, batch, "test")

    def on_train_end(self, trainer, pl_module) -> None:
        self._check(trainer, at_end=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.summary()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.summary()  # a failed fit gets no teardown hook

    def summary(self) -> None:
        """Warn once with the files skipped so far (called when the fit ends, however it ends)."""
        if self.files and not self._summarised:
            self._summarised = True
            share = f"{self.skipped} of {self.seen} training samples seen" if self.seen else "no training sample"
            log.warning("%d unreadable files were skipped in this run (%s): %s", len(self.files), share,
                        _names(self.files))
