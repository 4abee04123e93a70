"""Objectives, one per file; importing this package registers them all."""

from vlhub.objectives.base import IncompatibleObjective, Objective, build_objective
from vlhub.objectives.ce import CrossEntropyObjective
from vlhub.objectives.clip import ClipObjective, ContrastiveObjective
from vlhub.objectives.cloob import CloobObjective
from vlhub.objectives.coca import CocaObjective
from vlhub.objectives.dcl import DclObjective
from vlhub.objectives.declip import DeclipObjective
from vlhub.objectives.filip import FilipObjective
from vlhub.objectives.mlm import MlmObjective
from vlhub.objectives.siglip import SiglipObjective
from vlhub.objectives.simclr import SimclrObjective
from vlhub.objectives.slip import SlipObjective

__all__ = [
    "ClipObjective",
    "CloobObjective",
    "CocaObjective",
    "ContrastiveObjective",
    "CrossEntropyObjective",
    "DclObjective",
    "DeclipObjective",
    "FilipObjective",
    "IncompatibleObjective",
    "MlmObjective",
    "Objective",
    "SiglipObjective",
    "SimclrObjective",
    "SlipObjective",
    "build_objective",
]
