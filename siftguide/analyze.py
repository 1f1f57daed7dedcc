"""``python -m siftguide.analyze MODEL --out DIR``: see :mod:`siftguide.analysis.analyze`."""
from .analysis.analyze import main

if __name__ == "__main__":
    raise SystemExit(main())
