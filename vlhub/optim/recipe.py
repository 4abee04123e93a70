"""Optimizer recipes: an optimizer bound later to param groups, and an lr schedule by name.

``lr`` and ``warmup_steps`` are what the optimizer and the schedule get, whoever set them. Only when
``scale_with_batch`` asks for a rule is the lr (never the warmup) moved from ``reference_batch_size``
to the run's global batch, and the start of the run logs both values.

With no per-tower key and no ``layer_decay`` set, the groups are the two of :func:`build_param_groups`
(decayed, undecayed); otherwise the named groups of :mod:`vlhub.optim.groups`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlhub.optim.groups import TOWERS, build_tower_param_groups
from vlhub.optim.schedules import build_scheduler
from vlhub.registry import SCHEDULES

OptimizerFactory = Callable[..., torch.optim.Optimizer]

log = logging.getLogger(__name__)


# lr multiplier as a function of global batch / reference batch. sqrt: the square-root rule for
# Adam (Malladi et al. 2022); linear: Goyal et al. 2017. Both scale up as well as down.
BATCH_SCALING: dict[str, Callable[[float], float]] = {
    "none": lambda ratio: 1.0,
    "sqrt": math.sqrt,
    "linear": lambda ratio: ratio,
}


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


TOWER_KEYS = ("lr", "weight_decay")  # what optim.image / optim.text may set


@dataclass
class OptimRecipe:
    """What the ``optim`` config group builds; bound to the model by :meth:`build`."""

    optimizer: OptimizerFactory
    lr: float
    weight_decay: float  # values live in configs/optim/*.yaml: no second default here
    scheduler: str
    warmup_steps: int
    scale_with_batch: str = "none"  # none | sqrt | linear (BATCH_SCALING): the lr only, when asked
    reference_batch_size: int | None = None  # the global batch lr was chosen for; read only when scaling
    # Keys of configs/optim/shared/groups.yaml; None (unset) here keeps the plain two groups.
    image: Mapping[str, float | None] | None = None  # {lr, weight_decay}: null = optim.lr / optim.weight_decay
    text: Mapping[str, float | None] | None = None
    layer_decay: float | None = None  # in (0, 1]: BEiT / EVA-CLIP layer-wise lr decay
    layer_decay_towers: Sequence[str] | None = None  # None: both towers
    fused: bool = True  # configs/optim/shared/groups.yaml; see kernel_options

    def __post_init__(self) -> None:
        SCHEDULES.get(self.scheduler)  # an unknown name fails at launch, listing the known ones
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.scale_with_batch not in BATCH_SCALING:
            raise ValueError(
                f"scale_with_batch={self.scale_with_batch!r} is not a rule (known: {', '.join(BATCH_SCALING)})"
            )
        if self.scale_with_batch != "none" and (self.reference_batch_size or 0) <= 0:
            raise ValueError(
                f"reference_batch_size={self.reference_batch_size}: scale_with_batch={self.scale_with_batch} "
                "needs it > 0 (the global batch lr was chosen for)"
            )
        for tower in TOWERS:
            settings = dict(getattr(self, tower) or {})
            unknown = set(settings) - set(TOWER_KEYS)
            if unknown:
                raise ValueError(f"{tower}: unknown keys {sorted(unknown)} (known: {', '.join(TOWER_KEYS)})")
            if settings.get("lr") is not None and settings["lr"] <= 0:
                raise ValueError(f"{tower}.lr must be > 0, got {settings['lr']}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        unknown_towers = set(self.layer_decay_towers or ()) - set(TOWERS)
        if unknown_towers:
            raise ValueError(
                f"layer_decay_towers: unknown towers {sorted(unknown_towers)} (known: {', '.join(TOWERS)})"
            )

    def lr_for_batch(self, batch_size: int | None) -> float:
        """The base lr at global batch ``batch_size``: ``lr`` itself unless ``scale_with_batch`` asks."""
        if self.scale_with_batch == "none":
            return self.lr
        if batch_size is None:
            raise ValueError(f"scale_with_batch={self.scale_with_batch} needs the run's global batch size")
        assert self.reference_batch_size is not None  # checked in __post_init__
        return self.lr * BATCH_SCALING[self.scale_with_batch](batch_size / self.reference_batch_size)

    def tower_settings(self, tower: str) -> tuple[float, float]:
        """(lr, weight decay) of ``tower``: its own keys, else optim.lr / optim.weight_decay."""
        settings = dict(getattr(self, tower) or {})
        lr, weight_decay = settings.get("lr"), settings.get("weight_decay")
        return (self.lr if lr is None else lr), (self.weight_decay if weight_decay is None else weight_decay)

    def param_groups(self, modules: Iterable[nn.Module]) -> list[dict]:
        """The groups :meth:`build` hands the optimizer (each with its own ``lr``)."""
        modules = list(modules)
        named = self.layer_decay is not None or any(
            value is not None for tower in TOWERS for value in dict(getattr(self, tower) or {}).values()
        )
        if not named:
            return [group for group in build_param_groups(modules, self.weight_decay) if group["params"]]
        towers = TOWERS if self.layer_decay_towers is None else tuple(self.layer_decay_towers)
        groups = build_tower_param_groups(
            modules,
            self.lr,
            self.weight_decay,
            {tower: self.tower_settings(tower) for tower in TOWERS},
            self.layer_decay,
            towers,
        )
        return [group for group in groups if group["params"]]

    def kernel_options(self, groups: list[dict]) -> dict[str, bool]:
        """For an optimizer with a fused kernel (AdamW, Adam, SGD): ``fused=True`` when every parameter
        is on CUDA (one kernel launch for all parameters), else ``foreach=True`` (one launch per op over
        all parameters). Nothing when ``optim.fused=false``, when the optimizer's own config already
        chose, or when it has no fused kernel (then the key is ignored, saying so once)."""
        factory = self.optimizer
        optimizer_class = factory.func if isinstance(factory, functools.partial) else factory
        chosen = factory.keywords if isinstance(factory, functools.partial) else {}
        if not self.fused or "fused" in chosen or "foreach" in chosen:
            return {}
        try:
            takes = inspect.signature(optimizer_class).parameters
        except (TypeError, ValueError):
            takes = {}
        if "fused" not in takes:
            log.info("optim.fused: %s has no fused kernel; the key is ignored", optimizer_class.__name__)
            return {}
        if any(_mixes_sharded_and_plain(group["params"]) for group in groups):
            # FSDP2: sharded tower weights (DTensor) share groups with replicated ones (the
            # temperature, heads); torch's multi-tensor kernels refuse the mix, so one loop it is.
            log.info("optim.fused: sharded and replicated parameters share a group; per-parameter kernels")
            return {"foreach": False} if "foreach" in takes else {}
        if all(p.is_cuda for group in groups for p in group["params"]):
            return {"fused": True}
        return {"foreach": True} if "foreach" in takes else {}

    def build(
        self, modules: Iterable[nn.Module], max_steps: int, batch_size: int | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer and schedule for ``max_steps`` steps at global batch ``batch_size``."""
        groups = self.param_groups(modules)
        if not groups:
            raise ValueError("nothing to train: every parameter is frozen")
        lr = self.lr_for_batch(batch_size)
        if self.scale_with_batch != "none":
            log.info(
                "optim.scale_with_batch=%s: lr %.4g at reference batch %d -> lr %.4g at global batch %d "
                "(optim.warmup_steps=%d, unscaled)",
                self.scale_with_batch,
                self.lr,
                self.reference_batch_size,
                lr,
                batch_size,
                self.warmup_steps,
            )
        if self.warmup_steps >= max_steps:
            log.warning("optim: %d warmup steps in a %d-step run: the lr never peaks", self.warmup_steps, max_steps)
        for group in groups:  # per-tower and layer-decayed lrs scale with the base lr
            if "lr" in group:
                group["lr"] *= lr / self.lr
        optimizer = self.optimizer(groups, lr=lr, **self.kernel_options(groups))
        return optimizer, build_scheduler(optimizer, self.scheduler, self.warmup_steps, max_steps)


def _mixes_sharded_and_plain(params: list[torch.Tensor]) -> bool:
    """Whether ``params`` holds both sharded (DTensor) and plain tensors."""
    from torch.distributed.tensor import DTensor

    sharded = [isinstance(p, DTensor) for p in params]
    return any(sharded) and not all(sharded)
