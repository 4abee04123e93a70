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
  (:func:`vlhub.parallel.collectives.all_reduce_grads_`): exact, but communication never overlaps compute;
- ``ddp``: each trainable tower in torch's ``DistributedDataParallel``, whose bucketed all-reduce
  runs during the backward; parameters outside the towers (temperature, SigLIP's bias, objective
  heads) are few and small, and are averaged by hand in ``finish_gradients``;
- ``fsdp``: FSDP2 (``vlhub.parallel.fsdp``), registered in ``STRATEGIES``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlhub.parallel import collectives
from vlhub.parallel.environment import DistInfo

if TYPE_CHECKING:  # type hints only
    from vlhub.models.vision_language import VisionLanguageModel


class ParallelStrategy:
    """One process: gradients stay as the backward left them. The base of every strategy."""

    name = "none"
    collective_state = False  # True: every rank takes part in the state-dict hooks (they gather)

    def __init__(self, dist_info: DistInfo | None = None, precision: str = "fp32") -> None:
        """``precision`` is ``trainer.precision``: only a sharding strategy reads it (FSDP's policy)."""
        self.dist = dist_info

    def setup(self, model: nn.Module, objective: nn.Module) -> None:
        """Called once, on the device, before the optimizer is built."""

    def compile_targets(self, model: VisionLanguageModel) -> list[nn.Module]:
        """What ``trainer.compile`` compiles, before :meth:`setup`: what each tower says holds its compute."""
        return model.compile_units()

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Backward passes under this context accumulate locally; the next one outside it syncs."""
        return contextlib.nullcontext()

    def finish_gradients(self, params: Iterable[nn.Parameter], flags: Sequence[torch.Tensor | float] = ()) -> list[int]:
        """After the step's last backward: average what the backward did not; ``flags`` (small per-rank
        counts) summed over the ranks, in the same collective where there is one."""
        return collectives.all_reduce_sum([int(flag) for flag in flags])  # one process: no collective

    def model_state_dict(self, model: VisionLanguageModel) -> dict[str, torch.Tensor]:
        """The weights in the checkpoint's layout (open_clip's names)."""
        return model.open_clip_state_dict()

    def load_model_state_dict(self, model: VisionLanguageModel, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Weights in the checkpoint's layout into ``model``, every key."""
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
