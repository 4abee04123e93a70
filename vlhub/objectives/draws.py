"""Random numbers that are a function of the sample, not of when it is seen.

An objective's own random draws (MLM masks, which tokens become the mask token) must not come
from the global generator: a gradient-cache chunk, one rank of two, or one process at the
doubled batch would each draw them in another order. Instead each draw is a hash of
(``batch["sample_id"]``, position, stream): the loader's slot of the sample, the token index,
and a small integer naming the purpose of the draw. The hash is a 32-bit integer mixer applied
on whole tensors, so it costs one pass over [B, L] on any device.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2**31: products of 32-bit values stay inside int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values in [0, 2**32))."""
    x = (((x >> 16) ^ x) * _MULTIPLIER) & _MASK32
    x = (((x >> 16) ^ x) * _MULTIPLIER) & _MASK32
    return (x >> 16) ^ x


def sample_uniform(sample_id: torch.Tensor, width: int, stream: int) -> torch.Tensor:
    """[B, width] uniform numbers in [0, 1), a pure function of (sample id, column, stream)."""
    ids = sample_id.long().reshape(-1, 1) & _MASK32
    columns = torch.arange(width, device=sample_id.device, dtype=torch.long).reshape(1, -1)
    seeded = _mix(_mix(ids ^ ((stream * 0x9E3779B1) & _MASK32)) ^ columns)
    return _mix((seeded + 0x632BE5AB) & _MASK32).double().div(2.0**32).float()
