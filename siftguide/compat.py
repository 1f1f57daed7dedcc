"""Old import paths, kept working for users' scripts: each old module name maps to the names it used to export,
now defined elsewhere. Imported by ``siftguide/__init__.py``, so ``from siftguide.sift import detect_keypoints``
keeps working. New code imports from the new places.

| old module | new home |
|---|---|
| ``siftguide.sift`` | :mod:`siftguide.relevance.detector` (+ patch counting: :mod:`siftguide.relevance.maps`) |
| ``siftguide.source`` | :mod:`siftguide.relevance.stage` |
| ``siftguide.cache`` | :mod:`siftguide.relevance.cache` |
| ``siftguide.guidance.alignment`` | :mod:`siftguide.guidance.attention` (each mode's file is named as its config) |
| ``siftguide.guidance.recon`` | :mod:`siftguide.guidance.recon_weight` |
"""
from __future__ import annotations

import sys
import types

from .guidance import attention, recon_weight
from .relevance import cache, detector, maps, stage

_ALIASES = {
    "siftguide.sift": (detector, [(maps, ("counts_from_keypoints", "keypoint_patch_counts"))]),
    "siftguide.source": (stage, []),
    "siftguide.cache": (cache, []),
    "siftguide.guidance.alignment": (attention, []),
    "siftguide.guidance.recon": (recon_weight, []),
}


def _install() -> None:
    for old, (home, extra) in _ALIASES.items():
        if old in sys.modules:
            continue
        mod = types.ModuleType(old, f"Deprecated alias of {home.__name__} (see siftguide.compat).")
        mod.__dict__.update({k: v for k, v in vars(home).items() if not k.startswith("__")})
        for src, names in extra:
            mod.__dict__.update({n: getattr(src, n) for n in names})
        sys.modules[old] = mod


_install()
