"""One protocol for the random draws of the parts of a step (the relevance stage's controls, token dropping).

A part that draws its own random numbers owns a :class:`RandomStream`, named ``rng``: one ``torch.Generator`` per
device, created on first use from the stream's ``seed`` (the run's seed), so that drawing on the training device
needs no host sync and another part's draws never shift this part's. Parts that draw from torch's global generator
(augmentation, MAE's random masks, keypoint-guided masking) keep no stream: ``seed_everything`` seeds them and the
exact resume restores the global state.

The module gives each data-parallel rank its own streams (``reseed(seed + offset)``); the exact resume saves and
restores every stream (:meth:`RandomStream.state_dict`).
"""
from __future__ import annotations

import torch

__all__ = ["RandomStream"]


class RandomStream:
    """Generators seeded by ``seed``, one per device (``"cpu"``, ``"cuda:0"``, ...)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator of ``device`` (created, seeded with ``seed``, on first use)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def reseed(self, seed: int) -> None:
        """Start every device's draws again from ``seed``."""
        self.seed, self._generators = int(seed), {}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._generators = {}
        for key, value in state.get("generators", {}).items():
            self.generator(key).set_state(value)

    def __repr__(self) -> str:
        return f"RandomStream(seed={self.seed}, devices={sorted(self._generators)})"
