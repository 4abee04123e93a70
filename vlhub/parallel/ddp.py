"""``trainer.strategy=ddp``: each trainable tower in DistributedDataParallel."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlhub.parallel import collectives
from vlhub.parallel.environment import DistInfo
from vlhub.parallel.strategy import ParallelStrategy

if TYPE_CHECKING:  # type hints only
    from vlhub.models.towers import Tower, TowerOutput
    from vlhub.models.vision_language import VisionLanguageModel


def _ddp_options(device: torch.device) -> dict[str, Any]:
    """DDP's settings for a tower, and why.

    - Neither ``find_unused_parameters`` nor ``static_graph``. Every objective reaches every trainable
      weight of the towers it calls (tests/distributed/test_objectives_ddp.py, each objective), so the search
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


class GradientOnlyDDP:
    """How the model calls a DDP-wrapped tower: through the wrapper when gradients are on, bare otherwise.

    Without gradients (the gradient cache's first pass, scoring) the bare tower gives the same result
    with no data-parallel bookkeeping nor collective for a pass that has no backward. The wrapper's own
    call is what keeps DDP's gradient hooks in effect when there is a backward.
    """

    def __init__(self, tower: Tower, wrapper: DistributedDataParallel) -> None:
        self.tower, self.wrapper = tower, wrapper

    def __call__(self, inputs: torch.Tensor, output_tokens: bool = False) -> TowerOutput:
        call = self.wrapper if torch.is_grad_enabled() else self.tower
        return call(inputs, output_tokens=output_tokens)


class TowerDDP(ParallelStrategy):
    """Each tower with trainable weights in ``DistributedDataParallel``; the rest averaged by hand.

    The wrappers sit beside the towers, not inside the model's module tree (the model calls each
    wrapped tower through :class:`GradientOnlyDDP`, ``VisionLanguageModel.route_tower``), so the
    model's parameters and state_dict keys are those of one process. A tower
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

    def setup(self, model: VisionLanguageModel, objective: nn.Module) -> None:
        for name, tower in model.towers().items():
            if name == "text" and not objective.needs_text:  # never called: no buckets to hold
                continue
            trainable = [p for p in tower.parameters() if p.requires_grad]
            if not trainable:
                continue
            wrapper = DistributedDataParallel(tower, **_ddp_options(self.dist.device))
            if trainable[0].dtype != torch.float32:
                wrapper.register_comm_hook(None, _mean_in_fp32)
            model.route_tower(name, GradientOnlyDDP(tower, wrapper))
            self.wrappers[name] = wrapper
            self.wrapped.update(id(p) for p in trainable)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for wrapper in self.wrappers.values():
                stack.enter_context(wrapper.no_sync())
            yield

    def finish_gradients(self, params: Iterable[nn.Parameter], flags: Sequence[torch.Tensor | float] = ()) -> list[int]:
        return collectives.all_reduce_grads_((p for p in params if id(p) not in self.wrapped), flags=flags)
