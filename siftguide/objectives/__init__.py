"""Pre-training objectives. Each is a small ``nn.Module`` called as ``objective(net, images, batch)`` that returns
a dict with at least ``loss`` (scalar) and, where defined, ``logits``, ``features`` (B, D) and ``ids_keep``
(visible patch indices for masked objectives, so guidance can restrict its target to them)."""
from .mae import MAEObjective
from .supervised import SupervisedObjective

__all__ = ["SupervisedObjective", "MAEObjective"]
