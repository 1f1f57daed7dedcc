"""Tests of ``siftguide/analysis/``: one file per module (the commands analyze, compare, export, prompt; metrics, interrelation statistics, run discovery, statistics, the report)."""
