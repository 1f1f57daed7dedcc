"""Lightning callbacks of a run, one per file; ``configs/callbacks/default.yaml`` lists what a run uses.

| callback | file | what it does |
|---|---|---|
| :class:`TrainTimer` | ``timer.py`` | ``train/elapsed_s``, ``train/cost_s`` (GPU / process CPU time), ``train/throughput`` |
| :class:`ValidateAtEnd` | ``validate.py`` | validates the final step of a run stopped between validations |
| :class:`NonFiniteCheck` | ``nonfinite.py`` | stops a run whose loss became NaN/inf, without a per-step host sync |
| :class:`StepProgressBar` | ``progress.py`` | one progress bar over the run's optimizer steps |
| :class:`KNNEvaluator` | ``knn.py`` | online weighted kNN on frozen features after each validation |
| :class:`AttentionMonitor` | ``attention_monitor.py`` | attention/SIFT agreement during training |
| :class:`Preemption` | ``preemption.py`` | SIGTERM / SIGINT end the fit at the current step |
| :class:`SkippedFiles` | ``skips.py`` | unreadable files: one warning each, a summary, ``data.max_skip_fraction`` |
| :class:`GuidanceBalance` | ``balance.py`` | warns once when a guidance term drowns the task loss |

:func:`instantiate_callbacks` builds them from the config group.
"""
from __future__ import annotations

from .balance import GuidanceBalance
from .knn import KNNEvaluator
from .nonfinite import NonFiniteCheck, NonFiniteLossError
from .preemption import Preemption
from .progress import StepProgressBar
from .skips import SkippedFiles
from .timer import CostClock, TrainTimer
from .validate import ValidateAtEnd

__all__ = ["TrainTimer", "CostClock", "ValidateAtEnd", "NonFiniteCheck", "NonFiniteLossError", "StepProgressBar",
           "KNNEvaluator", "Preemption", "SkippedFiles", "GuidanceBalance", "AttentionMonitor",
           "instantiate_callbacks"]


def __getattr__(name: str):
    if name == "AttentionMonitor":  # imports the analysis package: only when asked for
        from .attention_monitor import AttentionMonitor

        return AttentionMonitor
    raise AttributeError(name)


def instantiate_callbacks(cfg, progress_bar: bool = True) -> list:
    """The callbacks of ``cfg`` (the ``callbacks`` node): every node with a ``_target_``, in order; a node set to
    null is left out (``callbacks.knn=null``), and so are progress bars when ``progress_bar`` is False
    (``trainer.enable_progress_bar=false``: Lightning refuses a progress-bar callback then)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar

    out = []
    for name, node in (cfg or {}).items():
        if node is None or "_target_" not in node:
            continue
        cb = instantiate(node)
        if isinstance(cb, ProgressBar) and not progress_bar:
            continue
        out.append(cb)
    return out
