"""Reading checkpoints safely, one way for every tool: resume (``train.py ckpt_path=...``), ``export``, ``analyze``
and ``prompt``.

A ``.ckpt`` file is a pickle: ``torch.load(weights_only=False)`` runs whatever code the file names, so a
checkpoint from someone else could do anything with the user's account. :func:`load_checkpoint` reads with
``weights_only=True`` (tensors, plain Python containers and numbers, and the types of :data:`SAFE_GLOBALS`) unless
the caller passes ``trust=True`` (the user's explicit switch: ``resume.trust_checkpoint=true`` for training,
``--trust-checkpoint`` for the command-line tools). Checkpoints written by ``train.py`` need no trust: siftguide
stores only tensors and plain types in them (:class:`~siftguide.run.resume.ResumeState` keeps numpy's RNG state as
tensors). Errors name the file: :class:`UntrustedCheckpointError` (the safe loader refused an object) and
:class:`UnreadableCheckpointError` (not a checkpoint, truncated, torn).
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UserError

__all__ = ["load_checkpoint", "safe_loading", "SAFE_GLOBALS", "CheckpointError", "UntrustedCheckpointError",
           "UnreadableCheckpointError"]

# Types beyond torch's own allow-list that a siftguide checkpoint may hold and that are safe to construct (data,
# never a callable that runs code). None today: Lightning's checkpoint and our callbacks' states are tensors, str,
# int, float, bool, None, lists, tuples and dicts. Add a type here (not trust) when a new state needs one.
SAFE_GLOBALS: tuple[type, ...] = ()


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used; the message names the file (raised by :mod:`siftguide.analysis.export` under its
    name ``ExportError`` too)."""


class UntrustedCheckpointError(CheckpointError):
    """The file holds pickled objects that ``torch.load(weights_only=True)`` refuses (it would run their code)."""


class UnreadableCheckpointError(CheckpointError):
    """The file is not a readable PyTorch checkpoint (truncated, torn, empty, another format)."""


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Context in which ``torch.load(weights_only=True)`` (ours, and Lightning's when it restores a checkpoint)
    also accepts :data:`SAFE_GLOBALS`."""
    if SAFE_GLOBALS and hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            yield
    else:
        if SAFE_GLOBALS:  # torch < 2.5: no context manager, the process-wide allow-list
            torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
        yield


def load_checkpoint(path: str | Path, trust: bool = False, switch: str = "resume.trust_checkpoint=true",
                    mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file on the CPU, safely unless ``trust``.

    Args:
        path: the ``.ckpt`` file.
        trust: unpickle arbitrary objects (runs the file's code): only for files the user trusts.
        switch: how the user turns ``trust`` on, named in the refusal.
        mmap: map the tensors' storage instead of reading it (cheap look at the metadata of a large file).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the safe loader refused an object (the message names ``switch``).
        UnreadableCheckpointError: not a readable checkpoint (the message names the file and the reason).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_loading():
            try:
                state = torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
            except RuntimeError as e:  # not torch's zip format (an old or a foreign file): no mmap, the real error
                if not (mmap and "mmap can only be used" in str(e)):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():  # an object the safe loader refuses
            raise UntrustedCheckpointError(
                f"{path} holds pickled objects that torch.load(weights_only=True) refuses (loading them would run "
                f"code from the file). If you trust the file, pass {switch}.\n{e}") from e
        raise UnreadableCheckpointError(f"{path} is not a PyTorch checkpoint, or is truncated or torn ({e})") from e
    except Exception as e:  # noqa: BLE001  (zip and pickle errors of every kind: torn, truncated, not a torch file)
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UnreadableCheckpointError(f"{path} is not a PyTorch checkpoint, or is truncated or torn "
                                        f"({type(e).__name__}: {reason})") from e
    if not isinstance(state, dict):
        raise UnreadableCheckpointError(f"{path} is not a Lightning checkpoint (it holds a {type(state).__name__})")
    return state


# ---------------------------------------------------------------------------------------------------- reading
