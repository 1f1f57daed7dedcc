"""Callbacks from the ``callbacks`` config group."""
from __future__ import annotations

__all__ = ["instantiate_callbacks"]


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
