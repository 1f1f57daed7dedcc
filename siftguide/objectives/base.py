"""The objective interface: what a pre-training objective receives and returns.

An objective is a small ``nn.Module`` called as ``objective(net, images, batch, stage, keep=None)``:

* ``net``: the timm ViT (the objective may own more parameters: a decoder, a probe, a teacher);
* ``images``: ``(B, C, H, W)`` normalised model inputs; ``batch``: the batch dict (``image`` in [0, 1],
  ``label``, ``index`` and, when a guidance mode needs it, ``relevance (B, Gh, Gw)``);
* ``stage``: ``train``, ``val`` or ``test`` (behaviour is chosen by the stage, never by grad mode);
* ``keep``: ``ids_keep (B, K)`` patch tokens to run (token dropping), for objectives with
  ``supports_token_drop``.

It returns an :class:`ObjectiveOutput`. Hooks: :meth:`Objective.setup` (once, with the net: build own parameters),
:meth:`Objective.on_train_batch_end` (after each optimizer step: e.g. an EMA teacher's update).

Hook points: an objective declares, in ``hook_points``, the named places of its computation that a guidance mode
may take over (``{"masking": "<signature>", ...}``); a mode with ``objective_hook = "masking"`` is plugged in by
:meth:`Objective.set_hook` when it is bound, and the objective reads it with :meth:`Objective.hook` (None: its
own default). So a new objective-side mode for an existing hook point needs no change to the objective.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["Objective", "ObjectiveOutput", "encode"]


@dataclass
class ObjectiveOutput:
    """loss: scalar to minimise; logits ``(B, classes)`` (supervised head or online probe); features ``(B, D)``;
    ids_keep ``(B, V)``: patch tokens the encoder saw (None: all), so guidance restricts relevance to them;
    metrics: detached scalars logged as ``<stage>/<name>``."""

    loss: Tensor
    logits: Tensor | None = None
    features: Tensor | None = None
    ids_keep: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


def encode(net: nn.Module, images: Tensor, ids_keep: Tensor | None = None, num_prefix: int | None = None) -> Tensor:
    """A timm ViT's features on a subset of patch tokens: ``(B, prefix + V, D)``.

    timm's own ``patch_embed`` and ``_pos_embed`` (position embeddings + prefix tokens), then the patch tokens
    ``ids_keep (B, V)`` (prefix tokens always kept; all patches when None), ``norm_pre``, ``blocks``, ``norm``.
    The caller chooses the tokens, so timm's own random ``patch_drop`` is not applied.
    """
    x = net._pos_embed(net.patch_embed(images))
    if ids_keep is not None:
        num_prefix = int(getattr(net, "num_prefix_tokens", 1)) if num_prefix is None else num_prefix
        prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
        patches = patches.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        x = torch.cat([prefix, patches], dim=1)
    return net.norm(net.blocks(net.norm_pre(x)))


class Objective(nn.Module):
    """Base class (see the module docstring)."""

    needs_labels = False  # True: training reads batch["label"] (a run with data.labels=false is refused)
    supports_token_drop = False  # True: forward() runs the given ``keep`` tokens (a token-selecting mode may serve it)
    hook_points: dict[str, str] = {}  # name -> the callable's contract; the points a guidance mode may take over

    def __init__(self) -> None:
        super().__init__()
        self.hooks: dict[str, Callable] = {}  # hook point -> the callable plugged in (not a submodule: no state)

    def set_hook(self, point: str, fn: Callable | None) -> None:
        """Plug ``fn`` into the hook point ``point`` (None: back to the objective's default)."""
        if point not in self.hook_points:
            raise ValueError(f"{type(self).__name__} has no hook point {point!r} (its hook_points: "
                             f"{sorted(self.hook_points) or 'none'})")
        if fn is None:
            self.hooks.pop(point, None)
        else:
            self.hooks[point] = fn

    def hook(self, point: str) -> Callable | None:
        """What is plugged into ``point``, or None."""
        return self.hooks.get(point)

    def setup(self, net: nn.Module) -> None:
        """Called once with the net before training (build the objective's own parameters here)."""
        self.num_prefix = int(getattr(net, "num_prefix_tokens", 1))

    def forward(self, net: nn.Module, images: Tensor, batch: dict, stage: str = "train",
                keep: Tensor | None = None) -> ObjectiveOutput:
        raise NotImplementedError

    def tokens(self, net: nn.Module, images: Tensor) -> Tensor:
        """Final tokens ``(B, N, D)`` of full images (for kNN evaluation and analysis)."""
        return net.forward_features(images)

    def on_train_batch_end(self, net: nn.Module, step: int) -> None:
        """After each optimizer step (EMA teachers, momentum schedules)."""

    @staticmethod
    def check_stage(stage: str) -> None:
        if stage not in ("train", "val", "test"):
            raise ValueError(f"stage must be 'train', 'val' or 'test', got {stage!r}")
