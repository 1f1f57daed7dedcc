"""Tests of ``siftguide/guidance/``: one file per mode (named as its config), the base, the composite and the schedule."""
