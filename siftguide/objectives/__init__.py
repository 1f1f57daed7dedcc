"""Pre-training objectives (see :mod:`siftguide.objectives.base` for the interface)."""
from .base import Objective, ObjectiveOutput, encode
from .mae import MAEObjective
from .supervised import SupervisedObjective

__all__ = ["Objective", "ObjectiveOutput", "encode", "SupervisedObjective", "MAEObjective"]
