"""Masked autoencoder (He et al. 2021) on an unmodified timm ViT encoder, with a light decoder.

Encoder: timm's own ``patch_embed`` and ``_pos_embed`` (position embeddings + class/register tokens), then a
random subset of ``(1 - mask_ratio) * P`` patch tokens per image (prefix tokens always kept), ``norm_pre``,
``blocks``, ``norm``. Guided blocks therefore attend over ``prefix + visible`` tokens; the objective returns
``ids_keep (B, V)`` so the guidance restricts the relevance to the visible patches and renormalises it.

Decoder: linear projection, learned mask token, fixed 2-D sin-cos position embeddings, ``decoder_depth`` timm
``Block``s, linear prediction of each patch's pixels. Loss: mean squared error on the masked patches, per-patch
normalised targets with ``norm_pix_loss`` (as in the paper).

From guidance (:class:`~siftguide.objectives.base.Guided`, training only): the visible tokens ``ids_keep (B, V)``
(the ``masking`` mode; otherwise masking is uniformly random, ``V = visible_count(P)`` either way) and per-patch
weights of the reconstruction loss (the ``recon_weight`` mode). Validation always uses random masks and the plain
loss, so ``val/loss`` compares across modes.

Online linear probe (solo-learn style): a linear classifier on the stop-gradient pooled encoder features of
labelled batches, trained alongside; it cannot change the encoder. ``val/acc`` is the probe's accuracy on full
(unmasked) images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Guided, Objective, ObjectiveOutput, encode, weighted_patch_loss

__all__ = ["MAEObjective", "random_masking", "patchify", "sincos_pos_embed"]


def patchify(images: Tensor, patch: tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, P, ph * pw * C)`` in row-major patch order (timm's token order)."""
    b, c, h, w = images.shape
    ph, pw = patch
    x = images.reshape(b, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def random_masking(batch: int, num_patches: int, n_keep: int, device: torch.device,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample random subsets: ``ids_keep (B, n_keep)`` (sorted) and ``mask (B, P)`` (1 = masked)."""
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, ids_keep, 0.0)
    return ids_keep, mask


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings ``(Gh * Gw, dim)`` (MAE's decoder embedding), patches in row-major
    order: ``[sin(y w), cos(y w), sin(x w), cos(x w)]`` with ``w_k = 10000^(-k / (dim / 4))``, ``k < dim / 4``.

    timm's ``build_sincos2d_pos_embed`` computes it; its channels come as ``[sin y, sin x, cos y, cos x]`` and are
    reordered to the layout above, which the decoder has always used.
    """
    from timm.layers import build_sincos2d_pos_embed

    if dim % 4:
        raise ValueError(f"decoder_dim must be divisible by 4 for 2-D sin-cos embeddings, got {dim}")
    emb = build_sincos2d_pos_embed(list(grid), dim=dim, temperature=10000.0)  # (P, dim): [sin y, sin x, cos y, cos x]
    return emb.view(-1, 2, 2, dim // 4).transpose(1, 2).reshape(-1, dim)  # (P, [sin, cos], [y, x], dim/4) -> y, x


class MAEObjective(Objective):
    """MAE loss + online linear probe. Call :meth:`setup` with the encoder before use (the module does)."""

    needs_labels = False
    offers = frozenset({"masked_tokens", "patch_weights"})

    def __init__(self, mask_ratio: float = 0.75, decoder_dim: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, norm_pix_loss: bool = True, num_classes: int = 0,
                 pool: str = "cls") -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.mask_ratio, self.norm_pix_loss, self.pool = mask_ratio, norm_pix_loss, pool
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_dim, decoder_depth, decoder_heads
        self.num_classes = num_classes
        self._ready = False

    def setup(self, net: nn.Module) -> None:
        from timm.models.vision_transformer import Block

        if not hasattr(net, "patch_embed") or not hasattr(net, "_pos_embed"):
            raise TypeError(f"objective=mae needs a timm VisionTransformer encoder, got {type(net).__name__}")
        if getattr(net, "dynamic_img_size", False):
            raise ValueError("objective=mae does not support dynamic_img_size=True encoders")
        self.patch = tuple(net.patch_embed.patch_size)
        self.grid = tuple(net.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_prefix = int(getattr(net, "num_prefix_tokens", 1))
        if self.pool == "cls" and getattr(net, "cls_token", None) is None:
            self.pool = "mean"
        dim = net.embed_dim
        in_chans = net.patch_embed.proj.in_channels
        self.decoder_embed = nn.Linear(dim, self.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_pos_embed(self.decoder_dim, self.grid).unsqueeze(0),
                             persistent=False)
        self.decoder = nn.Sequential(*[Block(self.decoder_dim, self.decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                       for _ in range(self.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(self.decoder_dim)
        self.decoder_pred = nn.Linear(self.decoder_dim, self.patch[0] * self.patch[1] * in_chans)
        self.probe = nn.Linear(dim, self.num_classes) if self.num_classes > 0 else None
        self._ready = True

    # ------------------------------------------------------------------------------------------------------------
    def encode(self, net: nn.Module, images: Tensor, ids_keep: Tensor | None) -> Tensor:
        """Encoder tokens ``(B, prefix + V, D)`` for the visible patches (all patches when ``ids_keep`` is None)."""
        return encode(net, images, ids_keep, self.num_prefix)

    def pooled(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0] if self.pool == "cls" else tokens[:, self.num_prefix :].mean(dim=1)

    def tokens(self, net: nn.Module, images: Tensor) -> Tensor:
        """Encoder tokens of full (unmasked) images ``(B, prefix + P, D)`` (for kNN evaluation)."""
        return self.encode(net, images, None)

    def visible_count(self, num_patches: int) -> int:
        """Visible patch tokens per image: ``round(P * (1 - mask_ratio))``, at least 1."""
        return max(1, int(round(num_patches * (1 - self.mask_ratio))))

    def forward(self, net: nn.Module, images: Tensor, batch: dict, stage: str = "train", guided: Guided | None = None,
                step: int = 0) -> ObjectiveOutput:
        if not self._ready:
            raise RuntimeError("MAEObjective.setup(net) must be called before use")
        self.check_stage(stage)
        b = images.shape[0]
        training = stage == "train"
        guided = guided if training and guided is not None else Guided()
        # at evaluation the probe sees full images; run that forward first so that the masked forward, whose
        # ids_keep is returned, is the one any attention capture records last
        full_feats = self.pooled(self.tokens(net, images)) if not training and self.probe is not None else None
        n_keep = self.visible_count(self.num_patches)
        if guided.ids_keep is not None:
            if guided.ids_keep.shape != (b, n_keep):
                raise ValueError(f"MAE runs {n_keep} visible tokens per image, guidance chose "
                                 f"{tuple(guided.ids_keep.shape)} (expected ({b}, {n_keep}))")
            ids_keep = guided.ids_keep
            mask = torch.ones(b, self.num_patches, device=images.device)
            mask.scatter_(1, ids_keep, 0.0)
        else:
            ids_keep, mask = random_masking(b, self.num_patches, n_keep, images.device)
        tokens = self.encode(net, images, ids_keep)
        # decoder: visible tokens + mask tokens back in patch order
        y = self.decoder_embed(tokens[:, self.num_prefix :])
        full = self.mask_token.expand(b, self.num_patches, -1).clone()
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)
        full = full + self.decoder_pos
        pred = self.decoder_pred(self.decoder_norm(self.decoder(full)))  # (B, P, p*p*C)
        target = patchify(images, self.patch)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(-1)
        if guided.patch_weights is not None:
            loss = weighted_patch_loss(per_patch, mask, guided.patch_weights, guided.weight_norm)
        else:
            loss = (per_patch * mask).sum() / mask.sum()
        out = ObjectiveOutput(loss=loss, ids_keep=ids_keep, metrics={"mae_loss": loss.detach()})
        labels = batch.get("label")
        if self.probe is not None and labels is not None:
            # stop-gradient probe: trained on detached features, never back-propagates into the encoder
            feats = self.pooled(tokens) if training else full_feats
            logits = self.probe(feats.detach())
            labelled = (labels >= 0).float()  # unlabelled images (label -1) do not train the probe; no host sync
            ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
            probe_loss = (ce * labelled).sum() / labelled.sum().clamp_min(1.0)
            out.logits = logits
            out.metrics["probe_loss"] = probe_loss.detach()
            out.loss = loss + probe_loss
        return out

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, decoder_dim={self.decoder_dim}, decoder_depth={self.decoder_depth}, "
                f"norm_pix_loss={self.norm_pix_loss}, pool={self.pool}")
