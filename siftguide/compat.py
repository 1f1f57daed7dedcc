"""Old import paths, kept working for users' scripts: each old module name maps to the names it used to export,
now defined elsewhere. Imported by ``siftguide/__init__.py``, so ``from siftguide.sift import detect_keypoints``
keeps working; a module is imported only when one of its names is first used. New code imports from the new
places.

| old module | new home |
|---|---|
| ``siftguide.sift`` | :mod:`siftguide.relevance.detector` (+ patch counting: :mod:`siftguide.relevance.maps`) |
| ``siftguide.source`` | :mod:`siftguide.relevance.stage` |
| ``siftguide.cache`` | :mod:`siftguide.relevance.cache` |
| ``siftguide.eval`` | :mod:`siftguide.callbacks.knn` |
| ``siftguide.analysis.callback`` | :mod:`siftguide.callbacks.attention_monitor` |
| ``siftguide.guidance.alignment`` | :mod:`siftguide.guidance.attention` (each mode's file is named as its config) |
| ``siftguide.guidance.recon`` | :mod:`siftguide.guidance.recon_weight` |
"""
from __future__ import annotations

import importlib
import sys
import types

# old name: (new home, {name: other module for names that moved elsewhere})
_ALIASES: dict[str, tuple[str, dict[str, str]]] = {
    "siftguide.sift": ("siftguide.relevance.detector", {"counts_from_keypoints": "siftguide.relevance.maps",
                                                        "keypoint_patch_counts": "siftguide.relevance.maps"}),
    "siftguide.source": ("siftguide.relevance.stage", {}),
    "siftguide.cache": ("siftguide.relevance.cache", {}),
    "siftguide.eval": ("siftguide.callbacks.knn", {}),
    "siftguide.analysis.callback": ("siftguide.callbacks.attention_monitor", {}),
    "siftguide.guidance.alignment": ("siftguide.guidance.attention", {}),
    "siftguide.guidance.recon": ("siftguide.guidance.recon_weight", {}),
}


class _Alias(types.ModuleType):
    """A module whose names are those of its new home (and of the modules some names moved to)."""

    def __init__(self, name: str, home: str, moved: dict[str, str]) -> None:
        super().__init__(name, f"Deprecated alias of {home} (see siftguide.compat).")
        self._home, self._moved = home, moved

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._moved.get(attr, self._home)), attr)

    def __dir__(self):
        return sorted(set(dir(importlib.import_module(self._home))) | set(self._moved))


for _old, (_home, _moved) in _ALIASES.items():
    sys.modules.setdefault(_old, _Alias(_old, _home, _moved))
