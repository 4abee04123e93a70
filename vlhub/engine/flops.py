"""Training FLOPs per sample, counted once on a real step.

The count is taken with torch's ``FlopCounterMode`` around one whole training step (the
objective's ``represent`` and ``loss`` forward, then the backward, as the gradient strategy runs
them), so an objective that runs the image tower on three views, or the gradient cache's extra
no-grad forward, shows in it. Counting the real step rather than a copy leaves the run exactly as
it would be without the count (no extra random numbers drawn, no BatchNorm statistics or queues
updated twice). The counter knows matrix products, convolutions and attention; element-wise work
and the optimizer update are not counted (they are a small share of a transformer's FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def count_flops(step: Callable[[], T]) -> tuple[T, int]:
    """Run ``step`` once under the FLOP counter; returns its result and the FLOPs it took (this process)."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = step()
    return result, int(counter.get_total_flops())
