"""Moved to ``siftguide.analysis.compare``; this module re-exports it so ``from siftguide.compare import ...`` and
``python -m siftguide.compare RUN_DIR ... --out DIR`` keep working."""
import sys

from siftguide.analysis.compare import *  # noqa: F401,F403  (the public names, listed in __all__)
from siftguide.analysis.compare import (  # noqa: F401  (module constants and helpers older scripts may use)
    BASELINE_NAMES, GUIDANCE_PREFIXES, IGNORED_PREFIXES, KIND_KEYS, LABEL_ALIASES, MODE_TARGET_PREFIX, REFERENCE_KIND,
    WRONG_MAP_KINDS,
    __all__, main,
)

if __name__ == "__main__":
    sys.exit(main())
