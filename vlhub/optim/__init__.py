"""Optimizer recipes: an optimizer bound later to param groups, and an lr schedule by name."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vlhub.optim.schedules import build_scheduler
from vlhub.registry import SCHEDULES

OptimizerFactory = Callable[..., torch.optim.Optimizer]

log = logging.getLogger(__name__)


def scale_for_batch(lr: float, warmup_steps: int, reference_batch_size: int, batch_size: int) -> tuple[float, int]:
    """A recipe published at ``reference_batch_size``, moved to a smaller global batch.

    The square-root rule for Adam: lr times sqrt(batch / reference) and warmup steps times
    sqrt(reference / batch), so the lr summed over the warmup stays the same. A batch at or
    above the reference keeps the published values (never a larger lr than was published).
    """
    ratio = min(1.0, batch_size / reference_batch_size)
    return lr * math.sqrt(ratio), round(warmup_steps / math.sqrt(ratio))


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
    reference_batch_size: int | None = None  # set: lr and warmup_steps are for this global batch

    def __post_init__(self) -> None:
        SCHEDULES.get(self.scheduler)  # an unknown name fails at launch, listing the known ones
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.reference_batch_size is not None and self.reference_batch_size <= 0:
            raise ValueError(f"optim.reference_batch_size must be > 0 or null, got {self.reference_batch_size}")

    def for_batch(self, batch_size: int | None) -> tuple[float, int]:
        """(lr, warmup steps) at global batch ``batch_size``: scaled when a reference batch is set."""
        if self.reference_batch_size is None or batch_size is None:
            return self.lr, self.warmup_steps
        return scale_for_batch(self.lr, self.warmup_steps, self.reference_batch_size, batch_size)

    def build(
        self, modules: Iterable[nn.Module], max_steps: int, batch_size: int | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer and schedule for ``max_steps`` steps at global batch ``batch_size``."""
        groups = [group for group in build_param_groups(modules, self.weight_decay) if group["params"]]
        if not groups:
            raise ValueError("nothing to train: every parameter is frozen")
        lr, warmup_steps = self.for_batch(batch_size)
        if (lr, warmup_steps) != (self.lr, self.warmup_steps):
            log.info(
                "optim: lr %.3g and %d warmup steps are for batch %d; at batch %d: lr %.3g, %d warmup steps "
                "(square-root rule; optim.reference_batch_size=null keeps them as given)",
                self.lr,
                self.warmup_steps,
                self.reference_batch_size,
                batch_size,
                lr,
                warmup_steps,
            )
        if warmup_steps >= max_steps:
            log.warning("optim: %d warmup steps in a %d-step run: the lr never peaks", warmup_steps, max_steps)
        optimizer = self.optimizer(groups, lr=lr)
        return optimizer, build_scheduler(optimizer, self.scheduler, warmup_steps, max_steps)
