"""One optimizer step, in order: gradients, unscale, clip, step, schedule, zero.

How gradients are computed is a strategy (:class:`PlainGradients`; the gradient cache is
another), so the step itself reads the same for every objective and batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from vlhub.data.batch import Batch, move_batch
from vlhub.engine.precision import Precision
from vlhub.objectives.base import Objective
from vlhub.parallel.strategy import ParallelStrategy

NoSync = Callable[[], contextlib.AbstractContextManager]


class GradientStrategy(Protocol):
    # True: the trainer hands over each batch already on the device, its copy overlapping the
    # previous step (vlhub.engine.prefetch). False: the strategy moves what it needs, when it needs it.
    batch_on_device: bool
    # Fewer good samples than this on some rank and every rank skips the step (counted as an empty batch).
    min_samples: int

    def __call__(
        self,
        model: nn.Module,
        objective: Objective,
        batch: Batch,
        precision: Precision,
        no_sync: NoSync = contextlib.nullcontext,
    ) -> dict[str, torch.Tensor]:
        """Accumulate d(loss)/d(params) into ``.grad``; return the detached loss parts.

        ``batch`` may still be on the host: the strategy moves what it needs, when it needs it,
        to ``precision.device``. Backward passes but the last run under ``no_sync()`` (the data
        parallel wrapper then syncs once, in the last one); a DDP forward decides whether its backward
        syncs, so each such forward runs under it too.
        """


def device_batch(batch: Batch, model: nn.Module, precision: Precision) -> Batch:
    """The batch on the device in the param dtype; uint8 images normalised with the model's stats."""
    stats = getattr(model, "image_stats", None)
    mean, std = (stats.mean, stats.std) if stats is not None else (None, None)
    return move_batch(batch, precision.device, precision.param_dtype, mean, std)


class PlainGradients:
    """The whole batch in one forward and one backward."""

    batch_on_device = True
    min_samples = 1

    def __call__(
        self,
        model: nn.Module,
        objective: Objective,
        batch: Batch,
        precision: Precision,
        no_sync: NoSync = contextlib.nullcontext,
    ) -> dict[str, torch.Tensor]:
        batch = device_batch(batch, model, precision)
        with precision.autocast():
            reps = objective.represent(model, batch)
            parts = objective.loss(reps, model)
        precision.scale(parts["loss"]).backward()
        return {name: value.detach() for name, value in parts.items()}


def train_step(
    model: nn.Module,
    objective: Objective,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    gradients: GradientStrategy,
    grad_clip_norm: float | None,
    parallel: ParallelStrategy | None = None,
) -> dict[str, torch.Tensor] | None:
    """The step's detached loss parts; None when the loss was not finite on some rank: then the
    gradients are dropped and the weights, optimizer state and schedule stay as they were.

    ``parallel`` shares gradients between ranks (``vlhub.parallel``); None: one process."""
    parallel = parallel or ParallelStrategy()
    parts = gradients(model, objective, batch, precision, no_sync=parallel.no_sync)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Data parallel: what the wrapper did not average during the backward (nothing on one process),
    # and in the same collective whether the loss was finite on every rank (no collective of its own).
    nonfinite = ~torch.isfinite(parts["loss"]).all()
    if parallel.finish_gradients(params, flags=[nonfinite])[0]:
        optimizer.zero_grad(set_to_none=True)
        return None
    precision.unscale_(optimizer)  # clip and log true gradients, not scaled ones
    if grad_clip_norm is not None:
        parts["grad_norm"] = parallel.clip_gradients_(params, grad_clip_norm)
    if precision.step(optimizer):  # applied (not skipped by the fp16 scaler): the objective's state follows (a queue)
        objective.after_step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return parts
