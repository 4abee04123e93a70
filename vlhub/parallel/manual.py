"""``trainer.strategy=manual``: every gradient all-reduced after the backward."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from vlhub.parallel import collectives
from vlhub.parallel.strategy import ParallelStrategy


class ManualAllReduce(ParallelStrategy):
    """Every gradient averaged after the backward, in flat buckets (no overlap with compute)."""

    name = "manual"

    def finish_gradients(self, params: Iterable[nn.Parameter], flags: Sequence[torch.Tensor | float] = ()) -> list[int]:
        return collectives.all_reduce_grads_(params, flags=flags)
