"""Folder scanning: the image files below a folder, in torchvision's order, without following a symlink into a loop."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("siftguide.data")

__all__ = ["scan_images"]


def scan_images(top: str, keep) -> list[str]:
    """Files below ``top`` for which ``keep(name)`` holds, in torchvision's ``make_dataset`` order (``os.walk``
    following directory symlinks, folders sorted by path, files by name), without following a symlink into a loop:
    a directory whose real path is the folder itself or one of its ancestors (``train/a/loop -> .``, ``up -> ../..``)
    is skipped with a warning naming it. (torchvision follows such links until the path is too long: a class of 8
    images became 328.) Links to folders elsewhere are followed."""
    def chain_of(path: str) -> tuple[str, ...]:
        real = os.path.realpath(path)
        out = [real]
        while os.path.dirname(out[-1]) != out[-1]:
            out.append(os.path.dirname(out[-1]))
        return tuple(out)

    chains = {top: chain_of(top)}
    found = []
    for root, dirs, files in os.walk(top, followlinks=True):
        chain = chains.pop(root, None) or chain_of(root)
        kept = []
        for d in sorted(dirs):
            path = os.path.join(root, d)
            real = os.path.realpath(path)
            if real in chain:
                log.warning("not following %s: a symlink to %s, which holds it (a loop); its images are read once",
                            path, real)
                continue
            chains[path] = (real, *chain)
            kept.append(d)
        dirs[:] = kept
        found.append((root, sorted(f for f in files if keep(f))))
    return [os.path.join(root, f) for root, names in sorted(found) for f in names]


