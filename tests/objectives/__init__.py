"""Tests of ``siftguide/objectives/``."""
