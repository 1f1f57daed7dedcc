"""Exact resume: a run killed at step k and resumed from its checkpoint ends as the uninterrupted run would.

Lightning's checkpoint holds weights, optimizer, LR scheduler and loop progress. The rest lives here:

* :func:`resolve_ckpt_path`: ``ckpt_path=last`` (the run directory's ``checkpoints/last.ckpt``, or a fresh start
  when there is none yet: an auto-resume switch for jobs that may be restarted), a run directory, or a file;
* :class:`ResumeState`: the RNG states (torch CPU/CUDA, numpy, python, and the generators of the relevance
  stage, guidance modes and objective), restored just before the first resumed step; the learning rate of the
  resumed step recomputed from the schedule (the optimizer holds the one of the saved step, and the schedule may
  have changed, e.g. a larger ``trainer.max_steps``); the logger's step counter realigned with the optimizer step
  (Lightning advances it once more when resuming from an end-of-fit checkpoint);
* :func:`continue_csv`: ``metrics.csv`` of the same run directory keeps its rows of the steps before the
  checkpoint (Lightning's CSV logger would delete the file), the resumed run appends the rest;
* :func:`wandb_id`: the wandb run id is kept in the run directory, so the resumed run continues it;
* :func:`config_changes`: what differs from the checkpoint's config (logged: a changed config is not a resume).

The data order is resumed by :class:`~siftguide.sampler.ResumableSampler`.
"""
from __future__ import annotations

import csv
import logging
import random
import secrets
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("siftguide.resume")

__all__ = ["ResumeState", "resolve_ckpt_path", "continue_csv", "wandb_id", "config_changes", "WANDB_ID_FILE",
           "RESULTS_FILE"]

WANDB_ID_FILE = "wandb_id"  # in the run directory: the wandb run id a resumed run continues
RESULTS_FILE = "results.json"  # in the run directory when a run ends: status finished / failed, final metrics
_KEY = "siftguide_resume"


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``None``; ``last``: ``<output_dir>/checkpoints/last.ckpt`` if it exists
    (else ``None``: a fresh run, logged); a run directory: its ``checkpoints/last.ckpt``; or a file."""
    if not ckpt_path:
        return None
    if str(ckpt_path) == "last":
        path = Path(output_dir) / "checkpoints" / "last.ckpt"
        if path.is_file():
            return path
        log.info("ckpt_path=last: no checkpoint in %s yet, starting a new run", path.parent)
        return None
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: no checkpoint at {path}. Give a .ckpt file, a run directory, or resume a run in "
            f"place with `hydra.run.dir=<run dir> ckpt_path=last`")
    return path


def same_run(ckpt: Path, output_dir: str | Path) -> bool:
    """Whether ``ckpt`` is a checkpoint of the run directory ``output_dir`` (resume in place, not a fork)."""
    return ckpt.resolve().parent.parent == Path(output_dir).resolve()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: dict, now: dict, ignore: tuple[str, ...] = ("paths.", "ckpt_path", "hydra."),
                   ignore_suffix: tuple[str, ...] = ("save_dir", "default_root_dir")) -> list[str]:
    """``key: saved -> now`` for every resolved config value that differs (keys of the run's location ignored)."""
    a, b = _flat(saved), _flat(now)
    return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(ignore) and not k.endswith(ignore_suffix)]


def checkpoint_info(path: Path) -> tuple[int, dict]:
    """``(global_step, resolved config)`` of a checkpoint, read without loading tensors into memory."""
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state.get("global_step", 0)), dict(state.get("hyper_parameters", {}).get("config") or {})


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


def _rng_owners(module) -> Iterator[tuple[str, Any]]:
    """Objects of the module that may hold their own ``torch.Generator`` (shuffled / random relevance, token
    dropping, ...)."""
    for name in ("relevance", "objective"):
        if getattr(module, name, None) is not None:
            yield name, getattr(module, name)
    guidance = getattr(module, "guidance", None)
    for name, mode in (getattr(guidance, "modes", None) or {}).items():
        yield f"guidance.{name}", mode


class ResumeState(L.Callback):
    """Saves what a checkpoint needs beyond Lightning's own state for an exact resume (see the module docstring)
    and restores it at ``on_train_start``, after data loaders and iterators were created (creating them may draw
    random numbers) and just before the first resumed step."""

    def __init__(self) -> None:
        self._pending: dict | None = None
        self._realign = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        gens = {f"{owner}.{attr}": {"device": str(g.device), "state": g.get_state()}
                for owner, obj in _rng_owners(pl_module) for attr, g in vars(obj).items()
                if isinstance(g, torch.Generator)}
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint[_KEY] = {  # tensors and plain types only: loadable with torch.load(weights_only=True)
            "torch": torch.get_rng_state(), "python": list(random.getstate()),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "generators": gens,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get(_KEY)
        self._realign = True
        if self._pending is None:
            log.warning("the checkpoint holds no RNG state (saved by an older siftguide): the resumed run continues "
                        "with fresh random draws, its metrics will differ from an uninterrupted run")

    def on_train_start(self, trainer, pl_module) -> None:
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
        owners = dict(_rng_owners(pl_module))
        for key, g in state["generators"].items():
            owner, attr = key.rsplit(".", 1)
            obj = owners.get(owner)
            if obj is None:
                continue
            gen = getattr(obj, attr, None)
            if not isinstance(gen, torch.Generator):  # created lazily on first use: create it now
                gen = torch.Generator(device=g["device"])
                setattr(obj, attr, gen)
            gen.set_state(g["state"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._realign:  # the logged step of the first resumed batch must be its optimizer step
            self._realign = False
            loop = trainer.fit_loop.epoch_loop
            if loop._batches_that_stepped != trainer.global_step:
                loop._batches_that_stepped = trainer.global_step

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
                sched._last_lr = lrs
