"""Everything distributed lives here: who am I, gather with gradient, rank-0 effects.

Towers hold no collectives; objectives call :func:`gather_features`; the engine calls
:func:`get_dist_info` once and routes rank-0-only effects through :func:`on_rank_zero`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (registers the autograd-aware all_gather)

R = TypeVar("R")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def get_dist_info(device: str = "auto") -> DistInfo:
    """Rank, world size, local rank and device, from torchrun's or SLURM's environment."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return DistInfo(rank, world_size, local_rank, torch.device(device))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def gather_features(features: torch.Tensor, *, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``features`` [B, ...] from every rank along dim 0, in rank order.

    With ``with_grad`` the local slice keeps its graph and the others are constants on this
    rank; because every rank computes the same global loss from the same gathered matrix,
    summing the per-rank gradients (DDP's all-reduce) gives the full gradient. Without it,
    the local slice is put back in place so local gradients still flow (open_clip's
    ``gather_with_grad=False`` semantics).
    """
    if not is_initialized() or world_size() == 1:
        return features
    if with_grad:
        gathered = torch.distributed.nn.functional.all_gather(features)
        return torch.cat(list(gathered), dim=0)
    gathered = [torch.zeros_like(features) for _ in range(world_size())]
    dist.all_gather(gathered, features.detach())
    gathered[rank()] = features
    return torch.cat(gathered, dim=0)


def on_rank_zero(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R | None:
    """Run ``fn`` on rank 0 only (logging, checkpoint writing, evaluation)."""
    return fn(*args, **kwargs) if rank() == 0 else None
