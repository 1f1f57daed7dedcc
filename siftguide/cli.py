"""Console scripts of the training entry point: ``siftguide-train [overrides]`` is ``python train.py
[overrides]`` from any directory.

``train.py`` and ``configs/`` sit at the top of the source checkout, next to this package, so the script needs the
package installed from the checkout (``pip install -e .``, as ``scripts/setup.sh`` does). Run directories go below
the current directory (``logs/``) unless ``SIFTGUIDE_ROOT`` or ``paths.log_dir`` says otherwise, as with
``python train.py``.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

__all__ = ["train"]


def checkout_root() -> Path:
    """The source checkout holding ``train.py`` and ``configs/`` (a clear error when installed without them)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "train.py").is_file() or not (root / "configs" / "train.yaml").is_file():
        raise SystemExit(f"siftguide-train runs the checkout's train.py with its configs/, but {root} has none: "
                         f"install siftguide from its source checkout with `pip install -e <checkout>` "
                         f"(scripts/setup.sh does), or run `python train.py` there")
    return root


def train() -> None:
    """``siftguide-train [hydra overrides]``: runs the checkout's ``train.py`` (Hydra resolves ``configs/``
    next to it; the overrides are this command's arguments)."""
    root = checkout_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    runpy.run_path(str(root / "train.py"), run_name="__main__")
