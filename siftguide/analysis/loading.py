"""Reading checkpoints, one way for every tool: resume (``train.py ckpt_path=...``), ``export``, ``analyze`` and
``prompt``; and the nets they look at.

A ``.ckpt`` file is a pickle: ``torch.load(weights_only=False)`` runs whatever code the file names, so a
checkpoint from someone else could do anything with the user's account. :func:`load_checkpoint` reads with
``weights_only=True`` (tensors, plain Python containers and numbers, and the types of :data:`SAFE_GLOBALS`) unless
the caller passes ``trust=True`` (the user's explicit switch: ``resume.trust_checkpoint=true`` for training,
``--trust-checkpoint`` for the command-line tools). Checkpoints written by ``train.py`` need no trust: siftguide
stores only tensors and plain types in them (:class:`~siftguide.resume.ResumeState` keeps numpy's RNG state as
tensors). Errors name the file: :class:`UntrustedCheckpointError` (the safe loader refused an object) and
:class:`UnreadableCheckpointError` (not a checkpoint, truncated, torn).

:func:`load_run_checkpoint` reads a run's checkpoint (a ``.ckpt`` or its run directory: the full ``state_dict``, the
resolved run config, the step) through :func:`load_checkpoint`; :func:`load_checkpoint_model` and
:func:`load_timm_model` give the nets to analyse (a checkpoint's ViT with its trained weights, or a timm model by
name).
"""
from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["load_checkpoint", "safe_loading", "SAFE_GLOBALS", "CheckpointError", "UntrustedCheckpointError",
           "UnreadableCheckpointError", "NET_PREFIX", "load_run_checkpoint", "encoder_state_dict", "AnalyzeError",
           "RANDOM_INIT", "LoadedModel", "looks_like_path", "load_checkpoint_model", "load_timm_model"]

NET_PREFIX = "net."

# Types beyond torch's own allow-list that a siftguide checkpoint may hold and that are safe to construct (data,
# never a callable that runs code). None today: Lightning's checkpoint and our callbacks' states are tensors, str,
# int, float, bool, None, lists, tuples and dicts. Add a type here (not trust) when a new state needs one.
SAFE_GLOBALS: tuple[type, ...] = ()


class CheckpointError(ValueError):
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
def _resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"no checkpoint in directory {p}: expected checkpoints/last.ckpt (a run directory) "
                                "or last.ckpt")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def _config_beside(ckpt: Path) -> dict:
    """The run directory's resolved ``config.yaml`` (``RUN/checkpoints/last.ckpt`` -> ``RUN/config.yaml``)."""
    import yaml

    for run_dir in (ckpt.parent.parent, ckpt.parent):
        for cand in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
            if cand.is_file():
                cfg = yaml.safe_load(cand.read_text())
                if isinstance(cfg, dict) and "model" in cfg:
                    return cfg
    return {}


def load_run_checkpoint(path: str | Path, trust: bool = False) -> tuple[dict[str, Tensor], dict, dict]:
    """Read a siftguide checkpoint (file or run directory); ``trust=True`` unpickles arbitrary objects.

    Returns:
        ``(state_dict, config, meta)``: the full Lightning ``state_dict``, the resolved run config (from
        ``hyper_parameters["config"]``, else the run directory's ``config.yaml``) and ``meta`` (``path``,
        ``global_step``, ``epoch``).
    """
    ckpt_path = _resolve_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path, trust=trust, switch="--trust-checkpoint")  # errors name the file
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{ckpt_path} is not a Lightning checkpoint: no 'state_dict' entry")
    state = ckpt["state_dict"]
    if not any(k.startswith(NET_PREFIX) for k in state):
        raise CheckpointError(f"{ckpt_path} is not a siftguide checkpoint: no '{NET_PREFIX}*' keys in its "
                              f"state_dict (first keys: {list(state)[:5]})")
    config = (ckpt.get("hyper_parameters") or {}).get("config") or _config_beside(ckpt_path)
    if not config:
        raise CheckpointError(f"{ckpt_path} holds no run config (hyper_parameters['config']) and no config.yaml "
                              "was found in its run directory: the timm model kwargs are unknown")
    meta = {"path": str(ckpt_path.resolve()), "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch")}
    return state, config, meta


def encoder_state_dict(state_dict: dict[str, Tensor], prefix: str = NET_PREFIX) -> dict[str, Tensor]:
    """The timm net's own entries, prefix removed (and torch.compile's ``_orig_mod.``); objective keys dropped."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            k = k[len(prefix):]
            out[k.removeprefix("_orig_mod.")] = v
    return out


RANDOM_INIT = "RANDOM INIT: pretrained weights not available"


class AnalyzeError(ValueError):
    """A user error (missing checkpoint, bad image folder, incompatible sizes): reported without a traceback."""


@dataclass
class LoadedModel:
    net: nn.Module
    source: str  # "checkpoint" | "timm"
    name: str
    pretrained: str  # "trained checkpoint" | "pretrained (timm)" | RANDOM_INIT line
    random_init: bool
    mean: list[float]
    std: list[float]
    config: dict | None = None
    sift: dict = field(default_factory=dict)
    relevance: dict = field(default_factory=dict)

    @property
    def in_chans(self) -> int:
        return int(self.net.patch_embed.proj.in_channels)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.net.patch_embed.img_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.net.patch_embed.patch_size)


def looks_like_path(spec: str) -> bool:
    return spec.endswith((".ckpt", ".pt", ".pth")) or os.sep in spec or spec.startswith(".")


def _fit_channels(values: Sequence[float], in_chans: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    return [sum(values) / len(values)] * in_chans


def load_checkpoint_model(path: str) -> LoadedModel:
    """A siftguide checkpoint (file or run directory) -> the net built from its config with its trained weights."""
    from hydra.utils import instantiate

    try:
        state, config, meta = load_run_checkpoint(path)
    except FileNotFoundError as e:
        raise AnalyzeError(str(e)) from e
    except CheckpointError as e:
        raise AnalyzeError(str(e)) from e
    if "model" not in config:
        raise AnalyzeError(f"{path}: the checkpoint's config has no 'model' node")
    net = instantiate(config["model"])
    missing, unexpected = net.load_state_dict(encoder_state_dict(state), strict=False)
    if missing or unexpected:
        raise AnalyzeError(f"{path}: the checkpoint's net weights do not fit the model of its config "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    tf = config.get("transform") or {}
    in_chans = int(net.patch_embed.proj.in_channels)
    mean = _fit_channels(tf.get("mean", [0.5]), in_chans)
    std = _fit_channels(tf.get("std", [0.5]), in_chans)
    # the relevance settings the run trained with: top-level `relevance` node, or the older `guidance.target`
    nodes = [config.get("relevance"), (config.get("guidance") or {}).get("target")]
    target = next((n for n in nodes if isinstance(n, dict) and ("sift" in n or "mode" in n)), {})
    sift = dict(target.get("sift") or {})
    relevance = {k: target[k] for k in ("mode", "temperature", "smoothing", "uniform_mix", "splat") if k in target}
    name = f"{config['model'].get('model_name', type(net).__name__)} from {meta['path']} (step {meta['global_step']})"
    return LoadedModel(net, "checkpoint", name, "trained checkpoint", False, mean, std, config, sift, relevance)


def load_timm_model(name: str, model_args: dict, pretrained: bool = True) -> LoadedModel:
    """A timm model by name: pretrained weights when they can be had, else random init (said loudly)."""
    import timm
    from timm.data import resolve_data_config

    note = "pretrained (timm)"
    random_init = False
    net = None
    if pretrained:
        try:
            net = timm.create_model(name, pretrained=True, **model_args)
        except Exception as e:  # noqa: BLE001 - no network, no weights for this name, hub errors: all fall back
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            note = f"{RANDOM_INIT} ({msg})"
    else:
        note = f"{RANDOM_INIT} (--random-init requested)"
    if net is None:
        random_init = True
        print(f"\n{'!' * 100}\n{note}\nThe analysis below describes a randomly initialised {name}, not a trained "
              f"model.\n{'!' * 100}\n", flush=True)
        net = timm.create_model(name, pretrained=False, **model_args)
    in_chans = int(net.patch_embed.proj.in_channels)
    cfg = resolve_data_config(model=net)
    return LoadedModel(net, "timm", name, note, random_init, _fit_channels(cfg["mean"], in_chans),
                       _fit_channels(cfg["std"], in_chans))
