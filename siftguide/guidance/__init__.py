"""Guidance modes: each consumes the batch's patch relevance in one place of the training step.

Each mode ``<name>`` lives in ``siftguide/guidance/<name>.py`` with its config ``configs/guidance/<name>.yaml``
and says what it does through the hooks of :class:`GuidanceMode` (:mod:`siftguide.guidance.base`,
``docs/extending.md``); :class:`Guidance` composes several in one run and knows no concrete mode.

| mode | class | acts in | what it does |
|---|---|---|---|
| ``attention`` | :class:`AttentionAlignment` | loss | KL from relevance to chosen blocks' (CLS or mean) attention |
| ``interrelation`` | :class:`PatchInterrelation` | loss | patch-to-patch attention toward relevance x locality |
| ``background`` | :class:`BackgroundSuppression` | loss | attention mass on keypoint-free patches, suppressed |
| ``prior`` | :class:`AttentionPrior` | forward | ``beta * log(V r + eps)`` added to attention logits |
| ``token_drop`` | :class:`TokenDrop` | forward | keep the most relevant patch tokens (cheaper steps) |
| ``masking`` | :class:`KeypointMasking` | objective (MAE) | mask relevant patches more often, with hints |
| ``recon_weight`` | :class:`KeypointReconWeight` | objective (MAE) | KAMIM keypoint-weighted reconstruction loss |
| ``attmask`` | :class:`AttMask` | objective (iBOT) | mask the most relevant patches of each global view |
"""
from .attention import DIVERGENCES, AttentionAlignment, divergence, kl_divergence
from .attmask import AttMask
from .background import BackgroundSuppression
from .base import BIAS, CAPTURE, AttentionLoss, GuidanceMode, LossTerms, visible_relevance
from .composite import Guidance
from .interrelation import PatchInterrelation, interrelation_target
from .masking import KeypointMasking, guided_masking
from .prior import AttentionPrior, relevance_bias
from .recon_weight import KeypointReconWeight, keypoint_weights
from .schedule import GuidanceSchedule
from .token_drop import TokenDrop, select_tokens
