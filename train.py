"""``python train.py [overrides]`` in a checkout: the entry point is :mod:`siftguide.train` (``siftguide-train``)."""
from siftguide.train import main
if __name__ == "__main__":
    main()
