from vlhub.objectives.base import Objective
from vlhub.objectives.clip import ClipObjective, ContrastiveObjective

__all__ = ["ClipObjective", "ContrastiveObjective", "Objective"]
