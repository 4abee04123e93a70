"""Optimizer recipes: an optimizer bound later to param groups, and an lr schedule by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vlhub.optim.schedules import build_scheduler
from vlhub.registry import SCHEDULES

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def build_param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Trainable parameters of ``modules`` in two groups: decayed matrices, undecayed rest.

    Gains, biases, the temperature and other 1-d parameters are not decayed (CLIP's rule).
    Frozen (locked) parameters are left out.
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass
class OptimRecipe:
    """What the ``optim`` config group builds; bound to the model by :meth:`build`."""

    optimizer: OptimizerFactory
    lr: float
    weight_decay: float  # values live in configs/optim/*.yaml: no second default here
    scheduler: str
    warmup_steps: int

    def __post_init__(self) -> None:
        SCHEDULES.get(self.scheduler)  # an unknown name fails at launch, listing the known ones
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")

    def build(
        self, modules: Iterable[nn.Module], max_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        groups = [group for group in build_param_groups(modules, self.weight_decay) if group["params"]]
        if not groups:
            raise ValueError("nothing to train: every parameter is frozen")
        optimizer = self.optimizer(groups, lr=self.lr)
        return optimizer, build_scheduler(optimizer, self.scheduler, self.warmup_steps, max_steps)
