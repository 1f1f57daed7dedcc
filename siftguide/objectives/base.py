"""The objective interface: what a pre-training objective receives and returns.

An objective is a small ``nn.Module`` called as ``objective(net, images, batch, stage, guided=None)``:

* ``net``: the timm ViT (the objective may own more parameters: a decoder, a probe, a teacher);
* ``images``: ``(B, C, H, W)`` normalised model inputs; ``batch``: the batch dict (``image`` in [0, 1],
  ``label``, ``index``);
* ``stage``: ``train``, ``val`` or ``test`` (behaviour is chosen by the stage, never by grad mode);
* ``guided``: what the guidance modes chose for this training step (:class:`Guided`): the patch tokens the encoder
  runs (``ids_keep``), per-patch loss weights, patch masks; None, or empty fields, mean the objective's own defaults;
* ``step``: the optimizer step (schedules of the objective's own, e.g. a teacher temperature).

It returns an :class:`ObjectiveOutput`. Hooks: :meth:`Objective.setup` (once, with the net: build own parameters),
:meth:`Objective.on_train_batch_end` (after each optimizer step: e.g. an EMA teacher's update).

What an objective can take from guidance is declared in ``offers`` (checked once against each mode's ``requires``,
:meth:`siftguide.guidance.GuidanceMode.check`): ``token_subset`` (it runs any given subset of patch tokens),
``masked_tokens`` (a masked objective: the visible tokens may be chosen for it, :meth:`Objective.visible_count` of
them), ``patch_weights`` (a per-patch reconstruction loss), ``patch_masks`` (which patches the student sees masked,
:meth:`Objective.mask_counts` of them per image). The objective never calls guidance: it receives tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Objective", "ObjectiveOutput", "Guided", "encode", "key_padding_bias", "pool_kept",
           "weighted_patch_loss"]


@dataclass
class Guided:
    """What guidance hands an objective for one training forward.

    ids_keep: ``(B, K)`` sorted patch indices the encoder runs (token dropping; a masked objective's visible
    tokens), None: the objective's own. patch_weights: ``(B, P)`` weights of a per-patch loss, None: unweighted.
    weight_norm: how the weighted loss is normalised (:func:`weighted_patch_loss`). patch_mask: ``(B, P)`` bool,
    True where the student sees a mask token instead of the patch (iBOT), None: the objective's own masks.
    keep_counts: ``(B,)`` with a per-image token budget: image ``i`` keeps the first ``keep_counts[i]`` tokens of
    its ``ids_keep`` row, the rest pad the static shape and are masked out of attention (:func:`encode`); None:
    every token of ``ids_keep`` is kept."""

    ids_keep: Tensor | None = None
    patch_weights: Tensor | None = None
    weight_norm: str = "mask"
    patch_mask: Tensor | None = None
    keep_counts: Tensor | None = None

    def token_shares(self, num_patches: int) -> dict[str, Tensor | float]:
        """The logged shares of the ``num_patches`` patch tokens: ``tokens_kept`` (mean over the batch) and, with a
        per-image budget, ``tokens_run`` (the row length the blocks run); empty when all tokens run."""
        if self.ids_keep is None:
            return {}
        n_run = self.ids_keep.shape[1]
        if self.keep_counts is None:
            return {"tokens_kept": n_run / num_patches}
        return {"tokens_kept": self.keep_counts.float().mean() / num_patches, "tokens_run": n_run / num_patches}


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


def encode(net: nn.Module, images: Tensor, ids_keep: Tensor | None = None, num_prefix: int | None = None,
           keep_counts: Tensor | None = None) -> Tensor:
    """A timm ViT's features on a subset of patch tokens: ``(B, prefix + V, D)``.

    timm's own ``patch_embed`` and ``_pos_embed`` (position embeddings + prefix tokens), then the patch tokens
    ``ids_keep (B, V)`` (prefix tokens always kept; all patches when None), ``norm_pre``, ``blocks``, ``norm``.
    The caller chooses the tokens, so timm's own random ``patch_drop`` is not applied. With ``keep_counts (B,)``
    only the first ``keep_counts[i]`` patch tokens of row ``i`` are attended to (an additive ``-inf`` key mask
    through timm's ``attn_mask``): every kept token's output equals that of the sequence without the padding.
    """
    x = net._pos_embed(net.patch_embed(images))
    if ids_keep is None:
        return net.norm(net.blocks(net.norm_pre(x)))
    num_prefix = int(getattr(net, "num_prefix_tokens", 1)) if num_prefix is None else num_prefix
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    patches = patches.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    x = net.norm_pre(torch.cat([prefix, patches], dim=1))
    if keep_counts is None:
        return net.norm(net.blocks(x))
    mask = key_padding_bias(keep_counts, ids_keep.shape[1], num_prefix, x.dtype)
    for block in net.blocks:
        x = block(x, attn_mask=mask)
    return net.norm(x)


def key_padding_bias(keep_counts: Tensor, n_tokens: int, num_prefix: int, dtype: torch.dtype) -> Tensor:
    """``(B, 1, 1, prefix + n_tokens)`` additive attention mask: 0 for the prefix and the first ``keep_counts[i]``
    patch tokens of row ``i``, ``-inf`` for the padding after them (no query attends to it)."""
    valid = torch.arange(n_tokens, device=keep_counts.device) < keep_counts[:, None]
    valid = torch.cat([valid.new_ones(valid.shape[0], num_prefix), valid], dim=1)
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
    return bias[:, None, None, :]


def pool_kept(net: nn.Module, tokens: Tensor, keep_counts: Tensor, num_prefix: int) -> Tensor:
    """``tokens`` ready for timm's ``forward_head`` when rows carry padding (``keep_counts``): with class-token
    pooling unchanged; with mean pooling the padded patch tokens are zeroed and the kept ones rescaled so timm's mean
    over all of them is the mean over the kept ones. Other poolings are refused."""
    pool = getattr(net, "global_pool", "token")
    if getattr(net, "attn_pool", None) is not None or pool not in ("token", "avg"):
        raise ValueError(f"a per-image token budget needs a ViT pooled by its class token or the mean of its patch "
                         f"tokens (global_pool 'token' or 'avg'), this one pools with {pool!r}; use "
                         f"token_drop.budget=fixed")
    if pool == "token":
        return tokens
    if getattr(net, "pool_include_prefix", False):
        raise ValueError("a per-image token budget with mean pooling over the prefix tokens is not supported; use "
                         "token_drop.budget=fixed")
    n = tokens.shape[1] - num_prefix
    valid = (torch.arange(n, device=tokens.device) < keep_counts[:, None]).to(tokens.dtype)
    scale = (valid * n / keep_counts[:, None].to(tokens.dtype)).unsqueeze(-1)
    return torch.cat([tokens[:, :num_prefix], tokens[:, num_prefix:] * scale], dim=1)


def weighted_patch_loss(per_patch: Tensor, mask: Tensor, weights: Tensor | None = None,
                        normalize: str = "mask") -> Tensor:
    """Scalar loss from ``per_patch (B, P)`` losses, ``mask (B, P)`` (1 = counted) and optional ``weights (B, P)``:
    ``sum(m l) / sum(m)`` without weights; ``sum(w m l) / sum(m)`` (``normalize="mask"``, KAMIM / SimMIM) or
    ``sum(w m l) / sum(w m)`` (``"weight"``, a weighted mean on the scale of the plain loss) with them."""
    if weights is None:
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
    wm = weights * mask
    if normalize == "mask":
        return (per_patch * wm).sum() / mask.sum().clamp_min(1.0)
    if normalize == "weight":
        return (per_patch * wm).sum() / wm.sum().clamp_min(1e-12)
    raise ValueError(f"normalize must be 'mask' or 'weight', got {normalize!r}")


class Objective(nn.Module):
    """Base class (see the module docstring)."""

    needs_labels = False  # True: training reads batch["label"] (a run with data.labels=false is refused)
    offers: frozenset[str] = frozenset()  # what guidance may hand it: token_subset | masked_tokens | patch_weights |
    # patch_masks

    def setup(self, net: nn.Module) -> None:
        """Called once with the net before training (build the objective's own parameters here)."""
        self.num_prefix = int(getattr(net, "num_prefix_tokens", 1))

    def visible_count(self, num_patches: int) -> int | None:
        """How many patch tokens a masked objective's encoder runs per image (``masked_tokens``); None otherwise."""
        return None

    def mask_counts(self, batch: int, device: torch.device | str) -> Tensor | None:
        """``(batch,)`` patches to mask per image this step (``patch_masks``: drawn by the objective); None otherwise."""
        return None

    def forward(self, net: nn.Module, images: Tensor, batch: dict, stage: str = "train", guided: Guided | None = None,
                step: int = 0) -> ObjectiveOutput:
        raise NotImplementedError

    def tokens(self, net: nn.Module, images: Tensor) -> Tensor:
        """Final tokens ``(B, N, D)`` of full images (for kNN evaluation and analysis)."""
        return net.forward_features(images)

    def evaluated(self, net: nn.Module) -> nn.Module:
        """The network evaluation forwards run (the run's net; a self-distillation teacher)."""
        return net

    def on_train_batch_end(self, net: nn.Module, step: int) -> None:
        """After each optimizer step (EMA teachers, momentum schedules)."""

    def before_optimizer_step(self, step: int) -> None:
        """After backward, before the optimizer step (gradients of the objective's own parameters, e.g. frozen)."""

    @staticmethod
    def check_stage(stage: str) -> None:
        if stage not in ("train", "val", "test"):
            raise ValueError(f"stage must be 'train', 'val' or 'test', got {stage!r}")
