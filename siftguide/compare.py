"""``python -m siftguide.compare RUN_DIR ... --out DIR``: the stable command name of :mod:`siftguide.analysis.compare`.

Exports only the entry point ``main``. Older scripts' ``from siftguide.compare import summarize`` (any name of
``siftguide.analysis.compare``) keeps working: such names are looked up there on first use.
"""
import sys

from siftguide.analysis.compare import main

__all__ = ["main"]


def __getattr__(name: str):
    # PEP 562: names this shim does not define come from the module that now owns them
    from siftguide.analysis import compare

    try:
        return getattr(compare, name)
    except AttributeError:
        raise AttributeError(f"module 'siftguide.compare' has no attribute {name!r}") from None


if __name__ == "__main__":
    sys.exit(main())
