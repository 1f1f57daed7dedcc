"""Exact resume: a run killed at step k and resumed from its checkpoint ends as the uninterrupted run would.

Lightning's checkpoint holds weights, optimizer, LR scheduler and loop progress. The rest lives here:

* :func:`resolve_ckpt_path`: ``ckpt_path=last`` (the run directory's ``checkpoints/last.ckpt``, or a fresh start
  when there is none yet: an auto-resume switch for jobs that may be restarted), a run directory, or a file;
  every file is read first with the safe loader (:func:`siftguide.run.checkpoint.load_checkpoint`), and a
  ``last.ckpt`` that cannot be read falls back to the previous checkpoint, ``last.prev.ckpt``, which
  :class:`RotatingCheckpointIO` keeps beside it;
* :class:`ResumeState`: the RNG states (torch CPU/CUDA, numpy, python, and the random streams of the relevance
  stage, guidance modes and objective, :mod:`siftguide.rng`), restored just before the first resumed step; the learning rate of the
  resumed step recomputed from the schedule (the optimizer holds the one of the saved step, and the schedule may
  have changed, e.g. a larger ``trainer.max_steps``), and the optimizer's hyper-parameters (learning rate, weight
  decay, betas) taken from the current config, so that a change allowed on resume (:mod:`siftguide.run.changes`)
  acts from the resumed step on; the logger's step counter realigned with the optimizer step
  (Lightning advances it once more when resuming from an end-of-fit checkpoint);
* :func:`continue_csv`: ``metrics.csv`` of the same run directory keeps its rows of the steps before the
  checkpoint (Lightning's CSV logger would delete the file), the resumed run appends the rest;
* :func:`wandb_id`: the wandb run id is kept in the run directory, so the resumed run continues it;
* :func:`config_changes`: what differs from the checkpoint's config (:mod:`siftguide.run.changes` decides what may).

The data order is resumed by :class:`~siftguide.data.sampler.ResumableSampler`.
"""
from __future__ import annotations

import csv
import logging
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from ..rng import RandomStream
from .checkpoint import UnreadableCheckpointError, load_checkpoint
from .errors import UserError

log = logging.getLogger("siftguide.run.resume")

__all__ = ["ResumeState", "CheckpointWriteError", "resolve_ckpt_path", "continue_csv", "wandb_id", "config_changes", "WANDB_ID_FILE",
           "RESULTS_FILE", "RotatingCheckpointIO", "LAST_CKPT", "PREV_CKPT", "load_weights"]

WANDB_ID_FILE = "wandb_id"  # in the run directory: the wandb run id a resumed run continues
RESULTS_FILE = "results.json"  # in the run directory when a run ends: status finished / failed, final metrics
LAST_CKPT = "last.ckpt"  # in <run dir>/checkpoints: the latest checkpoint
PREV_CKPT = "last.prev.ckpt"  # beside it: the one before (ckpt_path=last falls back to it)
_KEY = "siftguide_resume"


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (a full disk, a file too large); the message names the last good one."""


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path, trust: bool = False) -> Path | None:
    """The checkpoint to resume from: ``None``; ``last``: ``<output_dir>/checkpoints/last.ckpt`` if it exists
    (else ``None``: a fresh run, logged); a run directory: its ``checkpoints/last.ckpt``; or a file.

    The file is read first (safely unless ``trust``: see :func:`~siftguide.run.checkpoint.load_checkpoint`).
    For ``last`` and a run directory, a ``last.ckpt`` that cannot be read (torn, truncated) is renamed
    ``last.ckpt.corrupt`` with a warning naming it, and the previous checkpoint ``last.prev.ckpt`` is used."""
    if not ckpt_path:
        return None
    path, fallback = Path(ckpt_path), True
    if str(ckpt_path) == "last":
        path = Path(output_dir) / "checkpoints" / LAST_CKPT
        if not path.is_file() and not path.with_name(PREV_CKPT).is_file():
            log.info("ckpt_path=last: no checkpoint in %s yet, starting a new run", path.parent)
            return None
    elif path.is_dir():
        path = path / "checkpoints" / LAST_CKPT
    else:
        fallback = False
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path}: no checkpoint at {path}. Give a .ckpt file, a run directory, or resume a run "
                f"in place with `hydra.run.dir=<run dir> ckpt_path=last`")
    if not fallback:
        load_checkpoint(path, trust=trust, mmap=True)  # errors name the file (and the trust switch)
        return path
    prev = path.with_name(PREV_CKPT)
    if not path.is_file() and not prev.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path} (nor {prev.name})")
    if path.is_file():
        try:
            load_checkpoint(path, trust=trust, mmap=True)
            return path
        except UnreadableCheckpointError as e:
            problem = str(e)
        if not prev.is_file():
            raise UnreadableCheckpointError(f"{problem}; no previous checkpoint ({prev.name}) to fall back to")
        if rank_zero_only.rank == 0:  # out of the way: the next save must not rotate it into last.prev.ckpt
            os.replace(path, path.with_name(path.name + ".corrupt"))
            problem += f"; moved to {path.name}.corrupt"
    else:
        problem = f"{path} is missing"
    try:
        step = int(load_checkpoint(prev, trust=trust, mmap=True).get("global_step", 0))
    except UnreadableCheckpointError as e:
        raise UnreadableCheckpointError(f"neither checkpoint can be read: {problem}; {e}") from e
    log.warning("%s. Resuming from the previous checkpoint %s (step %d) instead", problem, prev, step)
    return prev


def same_run(ckpt: Path, output_dir: str | Path) -> bool:
    """Whether ``ckpt`` is a checkpoint of the run directory ``output_dir`` (resume in place, not a fork)."""
    return ckpt.resolve().parent.parent == Path(output_dir).resolve()


def config_changes(saved: dict, now: dict) -> list[str]:
    """``key: saved -> now`` for every resolved config value that differs (keys of the run's location ignored)."""
    from .changes import diff

    return [f"{k}: {a} -> {b}" for k, (a, b) in diff(saved, now).items()]


def checkpoint_info(path: Path, trust: bool = False) -> tuple[int, dict]:
    """``(global_step, resolved config)`` of a checkpoint, read without loading tensors into memory (safely unless
    ``trust``)."""
    state = load_checkpoint(path, trust=trust, mmap=True)
    return int(state.get("global_step", 0)), dict(state.get("hyper_parameters", {}).get("config") or {})


def load_weights(module: torch.nn.Module, path: Path, trust: bool = False) -> tuple[list[str], list[str]]:
    """A new run from a checkpoint's weights: the entries of its ``state_dict`` that fit ``module`` (same name and
    shape) are loaded; optimizer, schedule, step and RNG states are not. Returns ``(loaded, left)`` key lists (the
    module's own init kept for ``left``); raises when no ``net.*`` weight fits (another model)."""
    state = load_checkpoint(path, trust=trust)["state_dict"]
    own = module.state_dict()
    fit = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not any(k.startswith("net.") for k in fit):
        raise ValueError(f"resume.new_run: none of the net weights of {path} fit this model (another architecture "
                         f"or size?)")
    module.load_state_dict(fit, strict=False)
    left = sorted(set(own) - set(fit))
    return sorted(fit), left


class RotatingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer (a temporary file moved into place: a kill never leaves a torn file), plus:
    before ``last.ckpt`` is replaced, the current one is kept as ``last.prev.ckpt`` (a hard link where the file
    system allows, else a copy), so a ``last.ckpt`` damaged some other way (a full disk, a copy cut short, a file
    system that loses the rename) still leaves the previous checkpoint to resume from."""

    def __init__(self) -> None:
        super().__init__()
        self.last_good: tuple[Path, int] | None = None  # the last checkpoint this process wrote, and its step

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            if path.name == LAST_CKPT and path.is_file():
                prev, tmp = path.with_name(PREV_CKPT), path.with_name(PREV_CKPT + ".tmp")
                tmp.unlink(missing_ok=True)
                try:
                    os.link(path, tmp)
                except OSError:
                    shutil.copy2(path, tmp)
                os.replace(tmp, prev)
            super().save_checkpoint(checkpoint, path, storage_options)
        except OSError as e:
            raise CheckpointWriteError(self._failure(path, int(checkpoint.get("global_step", -1)), e)) from e
        self.last_good = (path, int(checkpoint.get("global_step", -1)))

    def _failure(self, path: Path, step: int, error: OSError) -> str:
        good = self.last_good
        if good is None and path.is_file():  # written by an earlier process of this run
            try:
                good = (path, int(load_checkpoint(path, mmap=True).get("global_step", -1)))
            except UnreadableCheckpointError:
                good = None
        kept = (f"the last good checkpoint, {good[0]} (step {good[1]}), is intact: free space or fix the file system, "
                f"then resume with ckpt_path=last") if good else "no earlier checkpoint of this run exists"
        return f"could not write the checkpoint {path} at step {step} ({type(error).__name__}: {error}); {kept}"


def continue_csv(logger, step: int) -> int:
    """Keep the rows of the run's ``metrics.csv`` logged before ``step`` (the checkpoint's optimizer step: rows
    ``>= step`` are logged again by the resumed run) and let ``logger`` (Lightning's ``CSVLogger``) append to it.
    Returns the number of rows kept."""
    if rank_zero_only.rank != 0:
        return 0
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    keep = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < step]
    writer = logger.experiment  # Lightning's writer deletes an existing metrics.csv when it is created
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=header)
        out.writeheader()
        out.writerows(keep)
    writer.metrics_keys = sorted(header)  # new columns are merged into this header (Lightning rewrites the file)
    log.info("metrics.csv: kept %d rows of steps < %d, dropped %d logged after the checkpoint", len(keep), step,
             len(rows) - len(keep))
    return len(keep)


def wandb_id(output_dir: str | Path, resume: bool) -> str:
    """The wandb run id of this run directory: the saved one when resuming in place, else a new one (saved)."""
    path = Path(output_dir) / WANDB_ID_FILE
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # os.urandom: no global RNG draw
    if rank_zero_only.rank == 0:
        path.write_text(run_id)
    return run_id


def _streams(module) -> Iterator[tuple[str, RandomStream]]:
    """The parts' own random streams (:mod:`siftguide.rng`): the relevance stage's, the objective's and each guidance
    mode's ``rng``, named by where they live."""
    parts = [("relevance", getattr(module, "relevance", None)), ("objective", getattr(module, "objective", None))]
    parts += [(f"guidance.{n}", m) for n, m in (getattr(getattr(module, "guidance", None), "modes", None) or {}).items()]
    for name, part in parts:
        if isinstance(getattr(part, "rng", None), RandomStream):
            yield name, part.rng


class ResumeState(L.Callback):
    """Saves what a checkpoint needs beyond Lightning's own state for an exact resume (see the module docstring)
    and restores it at ``on_train_start``, after data loaders and iterators were created (creating them may draw
    random numbers) and just before the first resumed step."""

    def __init__(self) -> None:
        self._pending: dict | None = None
        self._realign = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        streams = {name: rng.state_dict() for name, rng in _streams(pl_module)}
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint[_KEY] = {  # tensors and plain types only: loadable with torch.load(weights_only=True)
            "torch": torch.get_rng_state(), "python": list(random.getstate()),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "streams": streams,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get(_KEY)
        self._realign = True
        if self._pending is None:
            log.warning("the checkpoint holds no RNG state (saved by an older siftguide): the resumed run continues "
                        "with fresh random draws, its metrics will differ from an uninterrupted run")

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_config_hparams(trainer, pl_module)
        self._set_schedule_lr(trainer)
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        saved = state.get("streams", {})
        for name, rng in _streams(pl_module):
            if name in saved:
                rng.load_state_dict(saved[name])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._realign:  # the logged step of the first resumed batch must be its optimizer step
            self._realign = False
            loop = trainer.fit_loop.epoch_loop
            # Lightning's logger step counter has no public setter; it is one ahead after an end-of-fit checkpoint
            if loop._batches_that_stepped != trainer.global_step:
                loop._batches_that_stepped = trainer.global_step

    def _take_config_hparams(self, trainer, pl_module) -> None:
        """The optimizer's hyper-parameters of the current config, not the saved ones (the restored optimizer and
        scheduler hold the checkpoint's learning rate as ``initial_lr`` / ``base_lrs``, its weight decay and betas):
        a change allowed on resume acts from the resumed step on. Unchanged values are written back as they were."""
        if not self._realign or not trainer.optimizers:
            return
        fresh = pl_module.configure_optimizers()  # the current config's optimizer and schedule, never stepped
        fresh = fresh["optimizer"] if isinstance(fresh, dict) else fresh
        restored = trainer.optimizers[0]
        if len(restored.param_groups) != len(fresh.param_groups):
            log.warning("the checkpoint's optimizer has %d parameter groups, the config's %d: its hyper-parameters "
                        "are kept", len(restored.param_groups), len(fresh.param_groups))
            return
        for group, new in zip(restored.param_groups, fresh.param_groups):
            group.update({k: v for k, v in new.items() if k not in ("params", "lr", "initial_lr")})
            group["initial_lr"] = new.get("initial_lr", new["lr"])
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is restored and hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [g["initial_lr"] for g in restored.param_groups]

    def _set_schedule_lr(self, trainer) -> None:
        """The resumed step's LR from the (current) schedule, not the one the optimizer saved."""
        if not self._realign:
            return
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
                for group, lr in zip(sched.optimizer.param_groups, lrs):
                    group["lr"] = lr
                sched._last_lr = lrs  # what get_last_lr() reads: torch sets it only in step(), which would advance
