"""Before the trainer: the model and objective on the device, the same on every rank, compiled and
wrapped, with their optimizer and gradient strategy. The trainer only uses what this made."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from vlhub.data.batch import Batch, batch_size_of
from vlhub.engine.compile import CompiledTowers
from vlhub.engine.grad_cache import GradCache, restore_running_stats, running_stats
from vlhub.engine.precision import Precision
from vlhub.engine.step import GradientStrategy, PlainGradients
from vlhub.engine.trainer_config import TrainerConfig
from vlhub.objectives.base import Objective
from vlhub.optim import OptimRecipe
from vlhub.parallel.build import build_parallel
from vlhub.parallel.collectives import all_reduce_sum, broadcast_module_
from vlhub.parallel.environment import DistInfo, get_dist_info
from vlhub.parallel.strategy import ParallelStrategy
from vlhub.run.checkpoint import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    gradients: GradientStrategy  # chunk_size=auto: plain until the trainer's probe (choose_chunk_size)
    parallel: ParallelStrategy
    dist: DistInfo
    compiled: CompiledTowers | None = None


def build_gradient_strategy(batch_size: int, enabled: bool, chunk_size: int | None) -> GradientStrategy:
    """Plain backward, or the gradient cache in chunks of ``chunk_size`` (checked by TrainerConfig.check)."""
    if not enabled or chunk_size is None:
        return PlainGradients()
    return GradCache(chunk_size, chunks_per_step=batch_size // chunk_size)


def prepare(
    model: nn.Module,
    objective: Objective,
    optim: OptimRecipe,
    config: TrainerConfig,
    dist: DistInfo | None = None,
    parallel: ParallelStrategy | None = None,
) -> Prepared:
    """``dist``: this process's rank and device (default: from ``config.device``, one process);
    ``parallel``: how ranks share gradients (default: from ``config.strategy``)."""
    config.check()
    dist = dist or get_dist_info(config.device)
    parallel = parallel or build_parallel(config.strategy, dist, config.precision)
    precision = Precision(config.precision, dist.device)
    model.to(dist.device, dtype=precision.param_dtype)
    objective.to(dist.device, dtype=precision.param_dtype)
    broadcast_module_(model)  # data parallel: the same start on every rank
    broadcast_module_(objective)
    # Compile, then wrap (torch's order). Compiling is lazy and in place (vlhub/engine/compile.py);
    # the strategy says what to compile: each tower, or under FSDP each block before it is sharded.
    compiled = CompiledTowers(parallel.compile_targets(model), config.compile_strict) if config.compile else None
    # Data-parallel wrapping (DDP, FSDP2) happens here and only here: on the device, after the
    # broadcast, before the optimizer sees the parameters.
    parallel.setup(model, objective)
    global_batch = config.batch_size * dist.world_size  # what a recipe's reference batch is compared with
    optimizer, scheduler = optim.build([model, objective], config.max_steps, global_batch)
    chunk = config.grad_cache.chunk_size
    gradients = build_gradient_strategy(
        config.batch_size, config.grad_cache.enabled, None if chunk == "auto" else chunk
    )
    return Prepared(model, objective, optimizer, scheduler, precision, gradients, parallel, dist, compiled)


def choose_chunk_size(batch_size: int, device: torch.device, fits: Callable[[int], bool]) -> int | None:
    """``trainer.grad_cache.chunk_size=auto``: the largest divisor of the batch whose step ``fits``
    (a probe; monotone in the size, so a binary search); None: no cache (CPU, or the whole batch fits)."""
    key = "trainer.grad_cache.chunk_size=auto"
    if device.type != "cuda" or fits(batch_size):
        why = "the whole batch fits" if device.type == "cuda" else f"on {device.type}, memory is not probed"
        log.info("%s: no gradient cache (%s): batches of %d per rank", key, why, batch_size)
        return None
    sizes, best = [size for size in range(1, batch_size) if batch_size % size == 0], None
    low, high = 0, len(sizes) - 1
    while low <= high:
        middle = (low + high) // 2
        if fits(sizes[middle]):
            best, low = sizes[middle], middle + 1
        else:
            high = middle - 1
    if best is None:
        raise RuntimeError(f"{key}: not even one sample per chunk fits on {device}: lower trainer.batch_size")
    log.info(
        "%s: batch %d does not fit on %s; chunks of %d (%d per step)", key, batch_size, device, best, batch_size // best
    )
    return best


def probe_fits(prepared: Prepared, batch: Batch) -> Callable[[int], bool]:
    """Whether a step in chunks of n samples of ``batch`` fits the device: one forward and backward,
    its gradients dropped and the random state and BatchNorm statistics restored; every rank agrees
    (a rank that runs out of memory says so). Gradients are not synced in the probe; compiled towers
    run compiled (with their fallback to eager), as the steps will."""
    p = prepared

    def fits(chunk: int) -> bool:
        size = batch_size_of(batch)
        strategy = PlainGradients() if chunk >= size else GradCache(chunk, size // chunk)
        stats, rng, failed = running_stats(p.model), capture_rng_state(), 0
        try:
            with p.parallel.no_sync():
                step = partial(strategy, p.model, p.objective, batch, p.precision)
                if p.compiled is None:
                    step()
                else:
                    p.compiled.run(step, reset=p.optimizer.zero_grad)
        except torch.cuda.OutOfMemoryError:
            failed = 1
        finally:
            p.optimizer.zero_grad(set_to_none=True)
            restore_running_stats(stats)
            restore_rng_state(rng)
            torch.cuda.empty_cache()
        return all_reduce_sum([failed])[0] == 0

    return fits
