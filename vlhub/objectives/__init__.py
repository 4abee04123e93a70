"""Objectives, one per file; importing this package registers them all.

Every module of the package is imported here, so a new objective is its file (with
``@OBJECTIVES.register``), its YAML and its test file: nothing to add to a list. Each registered
class is also exported by its class name (``vlhub.objectives.ClipObjective``), the ``_target_``
the YAML names.
"""

import importlib
import pkgutil

from vlhub.objectives.base import IncompatibleObjective, Objective, build_objective
from vlhub.objectives.clip import ContrastiveObjective
from vlhub.registry import OBJECTIVES

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

globals().update({cls.__name__: cls for _, cls in OBJECTIVES.items()})

__all__ = [
    "ContrastiveObjective",
    "IncompatibleObjective",
    "Objective",
    "build_objective",
    *sorted(cls.__name__ for _, cls in OBJECTIVES.items()),
]
