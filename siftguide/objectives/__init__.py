"""Pre-training objectives (see :mod:`siftguide.objectives.base` for the interface)."""
from .base import Guided, Objective, ObjectiveOutput, encode, weighted_patch_loss
from .dino import DINOObjective
from .ibot import IBOTObjective
from .mae import MAEObjective
from .supervised import SupervisedObjective
