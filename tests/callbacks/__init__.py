"""Tests of ``siftguide/callbacks/``: one file per callback."""
