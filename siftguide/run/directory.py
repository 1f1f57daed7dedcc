"""A run directory holds one run: a training never replaces another one's files without being asked.

:func:`claim` runs before anything is written. A directory *holds a run* when it has a checkpoint
(``checkpoints/last.ckpt`` or ``last.prev.ckpt``), a ``results.json`` or a ``metrics.csv``. Starting a training there
is refused with :class:`RunDirectoryHoldsARun`, one paragraph saying what is there (status and step) and the two
ways on (``ckpt_path=last`` continues it; another ``hydra.run.dir``), unless the training continues that very run
(``ckpt_path=last`` or the directory's own checkpoint) or ``overwrite=true`` is given: then the old run's files are
moved to ``<run dir>/replaced-<date>/`` first, never deleted.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from .errors import UserError

__all__ = ["RunDirectoryHoldsARun", "describe", "claim", "RUN_FILES"]

log = logging.getLogger("siftguide.train")
# what a run leaves in its directory (moved aside by overwrite=true); .hydra/ and train.log belong to this process
RUN_FILES = ("checkpoints", "metrics.csv", "hparams.yaml", "results.json", "config.yaml", "config_history.yaml", "wandb",
             "wandb_id")


class RunDirectoryHoldsARun(UserError, FileExistsError):
    """A training would replace the files of another run in its directory."""


def describe(run_dir: Path) -> str | None:
    """What run ``run_dir`` holds, in words (``a finished run (step 300)``), or None when it holds none."""
    ckpts = [p for p in (run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.prev.ckpt")
             if p.is_file()]
    try:
        result = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        result = None
    metrics = run_dir / "metrics.csv"
    if result is not None:
        status = result.get("status", "unknown")
        return f"a {status} run (step {result.get('global_step', '?')})"
    if ckpts:
        return f"a run with a checkpoint ({ckpts[0].name}) and no results.json (killed, or still training elsewhere)"
    if metrics.is_file() and metrics.stat().st_size:
        return "a run with metrics.csv and no checkpoint (killed before its first checkpoint)"
    return None


def claim(run_dir: Path, continues: bool, overwrite: bool, main_process: bool = True) -> None:
    """Check that a training may write into ``run_dir`` (see the module docstring). ``continues``: it resumes the
    directory's own run; ``overwrite``: replace the run there (its files moved aside, by ``main_process`` only)."""
    held = None if continues else describe(run_dir)
    if held is None:
        return
    if not overwrite:
        raise RunDirectoryHoldsARun(
            f"{run_dir} already holds {held}, and this training would replace its files. Continue that run with "
            f"ckpt_path=last (and hydra.run.dir={run_dir}), or train into another directory (hydra.run.dir=...); "
            f"overwrite=true replaces it (its files are moved to {run_dir}/replaced-<date>/, not deleted)")
    if main_process:
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for name in RUN_FILES:
            if (run_dir / name).exists():
                shutil.move(str(run_dir / name), str(aside / name))
        log.warning("overwrite=true: %s held %s; its files were moved to %s", run_dir, held, aside)
