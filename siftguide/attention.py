"""Capture attention probabilities from chosen blocks of a timm ViT, exactly and only where needed.

timm's attention modules compute ``attn = softmax(q k^T * scale)`` and pass it through ``self.attn_drop`` on
their explicit (non-fused) path. Capture switches only the guided blocks to that path (``fused_attn = False``)
and reads the probabilities with a forward pre-hook on ``attn_drop``: the captured tensor *is* the tensor the
block multiplies with ``v`` (before dropout), so nothing is re-implemented and nothing in timm is forked.
Outside :meth:`AttentionCapture.capture` the model is untouched: every block keeps fused SDPA and no hook is
registered, so state never leaks into ``eval()`` or ``no_grad`` inference.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["AttentionCapture", "AttentionBias", "SUPPORTED_ATTENTION", "attention_to_patches", "prefix_tokens",
           "resolve_layers"]


def _supported_classes() -> tuple[type, ...]:
    """timm attention classes whose explicit path feeds the softmax probabilities to ``attn_drop``.

    Each was checked against its source and is covered by ``tests/test_attention.py`` (captured == recomputed).
    """
    from timm.layers.attention import Attention, AttentionRope

    classes: list[type] = [Attention, AttentionRope]
    try:
        from timm.models.eva import EvaAttention

        classes.append(EvaAttention)
    except ImportError:  # pragma: no cover - older timm
        pass
    return tuple(classes)


SUPPORTED_ATTENTION = _supported_classes()


def prefix_tokens(model: nn.Module) -> dict[str, int]:
    """Prefix tokens of a timm ViT: ``dict(num_prefix=..., cls_index=0 or -1)``.

    timm orders tokens as ``[cls?, dist?, registers..., patches...]`` and exposes ``num_prefix_tokens``.
    ``cls_index`` is -1 when the model has no class token (e.g. ``class_token=False, global_pool='avg'``).
    """
    if not hasattr(model, "blocks"):
        raise TypeError(
            f"{type(model).__name__} has no `.blocks`: attention guidance needs a timm VisionTransformer-style model "
            f"(timm.create_model('vit_...'), 'deit_...', 'eva_...')"
        )
    num_prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
    has_cls = getattr(model, "cls_token", None) is not None
    return dict(num_prefix=num_prefix, cls_index=0 if has_cls else -1)


def resolve_layers(model: nn.Module, layers: int | Sequence[int]) -> list[int]:
    """Block indices, negative ones counted from the end (``-1`` = last block), sorted and de-duplicated."""
    depth = len(model.blocks)
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise ValueError("layers must name at least one block")
    out = []
    for i in layers:
        j = int(i) + depth if int(i) < 0 else int(i)
        if not 0 <= j < depth:
            raise ValueError(f"layer index {i} out of range for a model with {depth} blocks (use -{depth}..{depth - 1})")
        out.append(j)
    return sorted(set(out))


class AttentionCapture:
    """Record attention probabilities ``(B, heads, N, N)`` of chosen blocks during a forward pass.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        >>> cap = AttentionCapture(vit, layers=[-1])
        >>> with cap.capture():
        ...     _ = vit(torch.randn(2, 3, 32, 32))
        >>> tuple(cap.maps[1].shape)
        (2, 3, 17, 17)
    """

    def __init__(self, model: nn.Module, layers: int | Sequence[int] = -1) -> None:
        self.layers = resolve_layers(model, layers)
        self.modules: dict[int, nn.Module] = {}
        for i in self.layers:
            attn = getattr(model.blocks[i], "attn", None)
            # exact class match: a subclass may override forward() and bypass attn_drop
            if type(attn) not in SUPPORTED_ATTENTION or not hasattr(attn, "attn_drop"):
                name = type(attn).__module__ + "." + type(attn).__qualname__ if attn is not None else "None"
                raise TypeError(
                    f"block {i} uses attention module {name}, which siftguide cannot capture exactly. Supported: "
                    + ", ".join(c.__qualname__ for c in SUPPORTED_ATTENTION)
                    + ". Guide other blocks (guidance.layers) or add support in siftguide/attention.py."
                )
            self.modules[i] = attn
        self.maps: dict[int, Tensor] = {}
        self._active = False
        self._detached = False

    @contextlib.contextmanager
    def capture(self) -> Iterator["AttentionCapture"]:
        """Within the context, guided blocks run timm's explicit attention and their probabilities are kept in
        ``self.maps[layer]`` (the latest forward wins). On exit fused attention and the model are restored."""
        if self._detached:
            raise RuntimeError("this AttentionCapture was detached from its model; create a new one")
        if self._active:
            raise RuntimeError("capture() is already active; nested captures are not supported")
        self.maps = {}
        handles, fused = [], {}
        try:
            for i, attn in self.modules.items():
                fused[i] = attn.fused_attn
                attn.fused_attn = False
                handles.append(attn.attn_drop.register_forward_pre_hook(self._hook(i)))
            self._active = True
            yield self
        finally:
            self._active = False
            for h in handles:
                h.remove()
            for i, f in fused.items():
                self.modules[i].fused_attn = f

    def _hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            probs = args[0]
            if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2]:
                raise RuntimeError(
                    f"block {layer}: expected attention probabilities (B, heads, N, N) at attn_drop, got "
                    f"{tuple(probs.shape)}; this attention module does not follow timm's convention"
                )
            self.maps[layer] = probs

        return hook

    def clear(self) -> None:
        self.maps = {}

    def detach(self) -> None:
        """Forget the model. Outside ``capture()`` the model carries nothing of ours, so it is already exact."""
        self.clear()
        self.modules = {}
        self._detached = True


def attention_to_patches(probs: Tensor, num_prefix: int, cls_index: int, kind: str,
                         heads: Sequence[int] | None = None, reduce_heads: bool = True) -> Tensor:
    """Reduce ``(B, heads, N, N)`` attention to a distribution over the ``P = N - num_prefix`` patch tokens.

    kind ``cls``: the class token's attention to each patch; ``mean``: attention each patch receives, averaged
    over all patch queries. Heads are averaged (``heads`` selects a subset; ``reduce_heads=False`` keeps them),
    prefix tokens removed and the result renormalised to sum to 1: ``(B, P)`` (or ``(B, h, P)``).
    """
    if heads is not None:
        probs = probs[:, list(heads)]
    if kind == "cls":
        if cls_index < 0:
            raise ValueError("attention='cls' needs a model with a class token; use attention='mean'")
        a = probs[:, :, cls_index, num_prefix:]  # (B, h, P)
    elif kind == "mean":
        a = probs[:, :, num_prefix:, num_prefix:].mean(dim=2)  # (B, h, P)
    else:
        raise ValueError(f"unknown attention kind {kind!r}; expected 'cls', 'mean' or 'auto'")
    if reduce_heads:
        a = a.mean(dim=1)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


class AttentionBias:
    """Add a per-key bias to the attention logits of chosen blocks: ``softmax(q k^T / sqrt(d) + b)``.

    ``bias_fn(num_tokens) -> (B, N)`` gives, per image, the bias of every key token (prefix tokens included);
    it is called at each guided block's forward, so it can follow a shortened sequence (dropped tokens). The
    bias enters through timm's own ``attn_mask`` argument (a float mask is added to the logits on both the fused
    SDPA and the explicit path), injected by a forward pre-hook on the block's attention module only inside
    :meth:`apply`; outside it the model is untouched. Used by the ``prior`` guidance mode and by inference
    prompting.
    """

    def __init__(self, model: nn.Module, layers: int | Sequence[int] = -1) -> None:
        from timm.layers.attention import Attention

        self.layers = resolve_layers(model, layers)
        self.modules = {}
        for i in self.layers:
            attn = getattr(model.blocks[i], "attn", None)
            if type(attn) is not Attention:
                raise TypeError(f"block {i} uses {type(attn).__qualname__}; the attention bias needs timm's "
                                f"Attention (attn_mask argument). Choose other layers.")
            self.modules[i] = attn

    @contextlib.contextmanager
    def apply(self, bias_fn) -> Iterator["AttentionBias"]:
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            bias = bias_fn(x.shape[1])  # (B, N)
            if bias.shape != x.shape[:2]:
                raise ValueError(f"attention bias must be (B, N) = {tuple(x.shape[:2])}, got {tuple(bias.shape)}")
            mask = bias.to(x.dtype)[:, None, None, :]  # (B, 1, 1, N): the same bias for every query and head
            if kwargs.get("attn_mask") is not None:
                mask = mask + kwargs["attn_mask"]
            kwargs = {**kwargs, "attn_mask": mask}
            return args, kwargs

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.modules.values()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
