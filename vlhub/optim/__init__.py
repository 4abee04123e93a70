"""Optimizer recipes (``recipe.py``), their parameter groups (``groups.py``) and schedules (``schedules.py``)."""

from vlhub.optim.recipe import (
    TOWER_KEYS,
    OptimizerFactory,
    OptimRecipe,
    build_param_groups,
)

__all__ = [
    "OptimRecipe",
    "OptimizerFactory",
    "TOWER_KEYS",
    "build_param_groups",
]
