"""How ranks share gradients: one strategy object per ``trainer.strategy``.

The trainer calls, in this order:
- ``setup(model, objective)`` once, after the model is on its device and identical on every rank,
  and before the optimizer is built (a sharding strategy replaces parameters in place, so the
  optimizer must see them after);
- per step, the gradient strategy runs its backward passes; the gradient cache runs every chunk's
  replay but the last under ``no_sync()`` (sync deferred to the last backward, SPEC section 4);
- ``finish_gradients(params, flags)`` after the step's last backward: whatever the wrapper did not
  average is averaged here, so every rank holds the same mean gradient before clipping; the step's
  non-finite-loss flag is summed over the ranks in the same collective (not one of its own);
- ``clip_gradients_(params, max_norm)`` when ``trainer.grad_clip_norm`` is set;
- ``model_state_dict`` / ``load_model_state_dict`` and ``optimizer_state_dict`` /
  ``load_optimizer_state_dict`` for checkpoints: full weights under open_clip's names, the same
  keys whichever strategy wrote them. Every rank calls them (a sharding strategy gathers to rank
  0, which writes), then ``save_shards`` (a sharding strategy's own resumable directory);
- ``evaluation_model(model)`` around the evaluation (every rank evaluates a share): the model each
  rank evaluates.

Strategies (``build_parallel``):
- one process (``auto`` with one rank): nothing to share;
- ``manual``: every gradient all-reduced in flat buckets after the backward
  (:func:`vlhub.distributed.all_reduce_grads_`): exact, but communication never overlaps compute;
- ``ddp``: each trainable tower in torch's ``DistributedDataParallel``, whose bucketed all-reduce
  runs during the backward; parameters outside the towers (temperature, SigLIP's bias, objective
  heads) are few and small, and are averaged by hand in ``finish_gradients``;
- ``fsdp``: FSDP2 (``vlhub.engine.fsdp``), registered in ``STRATEGIES``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlhub import distributed
from vlhub.distributed import DistInfo
from vlhub.errors import ConfigError


class ParallelStrategy:
    """One process: gradients stay as the backward left them. The base of every strategy."""

    name = "none"
    collective_state = False  # True: every rank takes part in the state-dict hooks (they gather)

    def __init__(self, dist_info: DistInfo | None = None, precision: str = "fp32") -> None:
        """``precision`` is ``trainer.precision``: only a sharding strategy reads it (FSDP's policy)."""
        self.dist = dist_info

    def setup(self, model: nn.Module, objective: nn.Module) -> None:
        """Called once, on the device, before the optimizer is built."""

    def compile_targets(self, model: nn.Module) -> list[nn.Module]:
        """What ``trainer.compile`` compiles, before :meth:`setup`: each tower's module."""
        from vlhub.engine.compile import tower_modules  # here: importing compile pulls in dynamo

        return tower_modules(model)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Backward passes under this context accumulate locally; the next one outside it syncs."""
        return contextlib.nullcontext()

    def finish_gradients(self, params: Iterable[nn.Parameter], flags: Sequence[torch.Tensor | float] = ()) -> list[int]:
        """After the step's last backward: average what the backward did not; ``flags`` (small per-rank
        counts) summed over the ranks, in the same collective where there is one."""
        return distributed.all_reduce_sum([int(flag) for flag in flags])  # one process: no collective

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.open_clip_state_dict()

    def load_model_state_dict(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        model.load_open_clip_state_dict(state_dict)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        optimizer.load_state_dict(state_dict)

    def clip_gradients_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their total norm is at most ``max_norm``; the norm before."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def save_shards(self, checkpointer: Any, optimizer: torch.optim.Optimizer, payload: dict[str, Any]) -> None:
        """Every rank, at each save, after the state-dict hooks: a sharding strategy writes its shards."""

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """Every rank, around the (sharded) evaluation: the model this rank evaluates its share with."""
        yield model


class ManualAllReduce(ParallelStrategy):
    """Every gradient averaged after the backward, in flat buckets (no overlap with compute)."""

    name = "manual"

    def finish_gradients(self, params: Iterable[nn.Parameter], flags: Sequence[torch.Tensor | float] = ()) -> list[int]:
        return distributed.all_reduce_grads_(params, flags=flags)


def _ddp_options(device: torch.device) -> dict[str, Any]:
    """DDP's settings for a tower, and why.

    - Neither ``find_unused_parameters`` nor ``static_graph``. Every objective reaches every trainable
      weight of the towers it calls (tests/test_objectives_ddp.py, each objective), so the search
      for unused weights would only cost a graph traversal per forward. A tower called twice before
      one backward (MLM's clean and masked captions, SimCLR's two views) needs neither: each weight's
      gradient is accumulated once per backward, so DDP's hook fires once. ``static_graph`` fails
      under ``no_sync`` (the gradient cache): an internal assert in torch's reducer. Weights a lock
      freezes (LiT) do not require gradients, so DDP leaves them out on its own.
    - No buffer sync in the forward: rank 0's BatchNorm statistics are the ones saved, and a
      broadcast from rank 0 never changes rank 0's own; other buffers are constants made identical
      at start. Skipping it saves a collective per forward (and per chunk).
    - ``gradient_as_bucket_view``: gradients live in the communication buckets (no copy, less memory).
    """
    options: dict[str, Any] = {"gradient_as_bucket_view": True}
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    options["forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"] = False
    if device.type == "cuda":
        options["device_ids"] = [device.index]
    return options


def _mean_in_fp32(process_group, bucket):  # unannotated: DDP rejects a quoted return annotation
    """DDP communication hook for low-precision gradients (``trainer.precision=bf16``): each bucket is
    averaged in fp32 and cast back, as the manual all-reduce does, rather than summed in bf16 over
    every rank."""
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    buffer = bucket.buffer()
    wide = buffer.float().div_(torch.distributed.get_world_size(group))
    future = torch.distributed.all_reduce(wide, group=group, async_op=True).get_future()
    return future.then(lambda done: buffer.copy_(done.value()[0]))


class TowerDDP(ParallelStrategy):
    """Each tower with trainable weights in ``DistributedDataParallel``; the rest averaged by hand.

    The wrappers sit beside the towers (``VisionLanguageModel.wrap_tower``), not inside the model's
    module tree, so the model's parameters and state_dict keys are those of one process. A tower
    fully locked (LiT), or the text tower of an image-only objective, is not wrapped. Parameters
    outside the towers are reached by the objective's ``loss`` or ``represent`` outside any DDP
    forward, so no DDP hook covers them: they are all-reduced once per step in ``finish_gradients``
    (a few kilobytes to a few megabytes of heads), which keeps ignore lists out of DDP.
    """

    name = "ddp"

    def __init__(self, dist_info: DistInfo, precision: str = "fp32") -> None:
        super().__init__(dist_info, precision)
        self.wrappers: dict[str, DistributedDataParallel] = {}
        self.wrapped: set[int] = set()  # ids of the parameters DDP reduces

    def setup(self, model: nn.Module, objective: nn.Module) -> None:
        for name in ("image", "text"):
            if name == "text" and not objective.needs_text:  # never called: no buckets to hold
                continue
            tower = getattr(model, f"{name}_tower", None)
            trainable = [p for p in tower.parameters() if p.requires_grad] if tower is not None else []
            if not trainable:
                continue
            wrapper = DistributedDataParallel(tower, **_ddp_options(self.dist.device))
            if trainable[0].dtype != torch.float32:
                wrapper.register_comm_hook(None, _mean_in_fp32)
            model.wrap_tower(name, wrapper)
            self.wrappers[name] = wrapper
            self.wrapped.update(id(p) for p in trainable)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for wrapper in self.wrappers.values():
                stack.enter_context(wrapper.no_sync())
            yield

    def finish_gradients(self, params: Iterable[nn.Parameter], flags: Sequence[torch.Tensor | float] = ()) -> list[int]:
        return distributed.all_reduce_grads_((p for p in params if id(p) not in self.wrapped), flags=flags)


def _fsdp(dist_info: DistInfo, precision: str = "fp32") -> ParallelStrategy:
    from vlhub.engine.fsdp import FsdpStrategy  # it builds on ParallelStrategy: imported when chosen

    return FsdpStrategy(dist_info, precision)


# Name -> strategy for more than one rank; ``auto`` picks ``ddp`` there and one process otherwise.
STRATEGIES: dict[str, Callable[[DistInfo, str], ParallelStrategy]] = {
    "ddp": TowerDDP,
    "fsdp": _fsdp,
    "manual": ManualAllReduce,
}
NEEDS_PROCESS_GROUP = ("ddp", "fsdp")


def build_parallel(strategy: str, dist_info: DistInfo, precision: str = "fp32") -> ParallelStrategy:
    """The strategy named by ``trainer.strategy`` for this launch; a ConfigError naming the key when it
    cannot run here. Call after ``init_distributed``. ``precision`` is ``trainer.precision`` (FSDP's
    mixed-precision policy follows it)."""
    known = ["auto", *STRATEGIES]
    if strategy not in known:
        raise ConfigError(
            f"trainer.strategy={strategy!r} is not a strategy: one of {', '.join(known)}",
            hint="auto is ddp with several ranks and plain single-process training with one",
        )
    grouped = dist_info.distributed and distributed.is_initialized()
    if strategy == "auto":
        strategy = "ddp" if grouped else "none"
    if strategy in NEEDS_PROCESS_GROUP and not grouped:
        raise ConfigError(
            f"trainer.strategy={strategy} needs several processes in a process group, and this run is "
            f"{'one process' if not dist_info.distributed else 'not in a process group'}",
            hint="launch with torchrun --nproc_per_node=N (or SLURM tasks), or use trainer.strategy=auto",
        )
    if strategy == "none":
        return ParallelStrategy(dist_info, precision)
    return STRATEGIES[strategy](dist_info, precision)
