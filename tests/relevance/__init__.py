"""Tests of ``siftguide/relevance/``: one file per module."""
