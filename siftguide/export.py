"""``python -m siftguide.export CKPT --out DIR``: see :mod:`siftguide.analysis.export`."""
from .analysis.export import ExportError, export_checkpoint, main

__all__ = ["ExportError", "export_checkpoint", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
