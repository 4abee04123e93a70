"""Learning-rate schedules as pure functions of the step (so a resumed run may change the end)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from vlhub.registry import SCHEDULES


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


@SCHEDULES.register("constant")
def constant_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    return _warmup(step, warmup_steps)


@SCHEDULES.register("cosine")
def cosine_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, max_steps: int) -> LambdaLR:
    factor = SCHEDULES.get(name)
    return LambdaLR(optimizer, partial(factor, warmup_steps=warmup_steps, max_steps=max_steps))


def load_scheduler_state(scheduler: LambdaLR, state: dict) -> None:
    """A checkpoint's schedule position, with each group's lr recomputed from this run's schedule:
    a resumed run may change ``max_steps``, so the stored lr would be the old schedule's."""
    scheduler.load_state_dict(state)
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
