"""Validation at the final step of a run stopped between validations."""
from __future__ import annotations

import lightning as L

__all__ = ["ValidateAtEnd"]


class ValidateAtEnd(L.Callback):
    """Remembers the last validated optimizer step, so that a run stopped between validations
    (``trainer.max_steps``) is validated once more at its final step: ``val/*`` is always written."""

    def __init__(self) -> None:
        self.last_step = -1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.last_step = trainer.global_step

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}  # a resumed run that ends where it was saved is not validated twice

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = state_dict.get("last_step", -1)

    @staticmethod
    def run(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        cb = next((c for c in trainer.callbacks if isinstance(c, ValidateAtEnd)), None)
        if cb is not None and cb.last_step != trainer.global_step and trainer.global_step > 0:
            trainer.validate(module, datamodule=datamodule, verbose=False)
