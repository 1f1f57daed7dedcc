"""The Hydra configs of siftguide (package data: ``siftguide-train`` finds them in an installed wheel)."""
