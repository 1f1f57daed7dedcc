"""Reading a run's checkpoint for the analysis tools (``export``, ``analyze``, ``prompt``), and the nets they look at.

:func:`load_run_checkpoint` reads a run's checkpoint (a ``.ckpt`` or its run directory: the full ``state_dict``, the
resolved run config, the step) through the safe loader (:func:`siftguide.run.checkpoint.load_checkpoint`);
:func:`load_checkpoint_model` and :func:`load_timm_model` give the nets to analyse (a checkpoint's ViT with its
trained weights, or a timm model by name).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from torch import Tensor, nn

from ..run.checkpoint import CheckpointError, UnreadableCheckpointError, UntrustedCheckpointError, load_checkpoint

__all__ = ["NET_PREFIX", "load_run_checkpoint", "encoder_state_dict", "AnalyzeError", "RANDOM_INIT", "LoadedModel",
           "looks_like_path", "load_checkpoint_model", "load_timm_model", "CheckpointError",
           "UnreadableCheckpointError", "UntrustedCheckpointError", "load_checkpoint"]

NET_PREFIX = "net."


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
    """A user error (missing checkpoint, bad image folder, mismatched sizes): reported without a traceback."""


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
