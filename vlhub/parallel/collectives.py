"""Collectives every rank calls together: gathers (objectives call :func:`gather_features`), reductions,
broadcasts and barriers; each is a no-op in one process. Evaluation runs on every rank, each encoding
a share (``vlhub.eval.sharding``); under ``trainer.strategy=fsdp`` the towers' forwards are collectives too."""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (registers the autograd-aware all_gather)

from vlhub.parallel.environment import is_initialized, rank, world_size

R = TypeVar("R")
log = logging.getLogger(__name__)
# The autograd-aware all_gather is deprecated in favour of a private API; it still works.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


def _all_sizes(local: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local], device=device))
    return [int(s) for s in sizes]


def gather_features(features: torch.Tensor, *, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """Concatenate ``features`` [B_r, ...] from every rank along dim 0, in rank order.

    Returns the gathered tensor and the offset of this rank's rows in it. Ranks may hold
    different batch sizes (a skipped bad sample); rows are padded for the collective and
    the padding is dropped. With ``with_grad`` the gather is differentiable: every rank
    computes the same global loss, and the all-gather's backward sums each rank's share, so
    DDP's averaged gradient equals the single-process gradient of that loss. Without it,
    only this rank's slice carries gradient (open_clip's ``gather_with_grad=False``).
    """
    if not is_initialized() or world_size() == 1:
        return features, 0
    sizes = _all_sizes(features.shape[0], features.device)
    largest, me = max(sizes), rank()
    padded = torch.nn.functional.pad(features, (0, 0) * (features.ndim - 1) + (0, largest - features.shape[0]))
    if with_grad:
        parts = list(torch.distributed.nn.functional.all_gather(padded))
    else:
        parts = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.detach())
        parts[me] = padded
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]), sum(sizes[:me])


def all_reduce_grads_(
    params: Iterable[torch.nn.Parameter],
    bucket_elements: int = 16_000_000,
    flags: Sequence[torch.Tensor | float] = (),
) -> list[int]:
    """Average the gradients of ``params`` over ranks in place, in flat buckets.

    A parameter without a gradient on this rank counts as zeros, so that every rank reduces the same
    buckets in the same order; one that no rank reached keeps no gradient (as in one process: the
    optimizer skips it rather than decaying it). Each bucket carries one presence flag per parameter.

    ``flags``: small per-rank counts (scalars, on the device or not) summed over ranks in the last
    bucket's collective rather than one of their own (the step's non-finite-loss flag); the sums are
    returned, the same on every rank.
    """
    if not is_initialized() or world_size() == 1:
        return [int(flag) for flag in flags]
    bucket: list[torch.nn.Parameter] = []
    filled = 0
    for param in params:
        if not param.requires_grad:
            continue
        bucket.append(param)
        filled += param.numel()
        if filled >= bucket_elements:
            _all_reduce_bucket(bucket)
            bucket, filled = [], 0
    if bucket or flags:
        return _all_reduce_bucket(bucket, flags)
    return []


def _all_reduce_bucket(bucket: list[torch.nn.Parameter], flags: Sequence[torch.Tensor | float] = ()) -> list[int]:
    device = bucket[0].device if bucket else _collective_device()
    zeros = torch.zeros(max((p.numel() for p in bucket), default=0), device=device)
    grads = [p.grad.reshape(-1).float() if p.grad is not None else zeros[: p.numel()] for p in bucket]
    present = torch.tensor([float(p.grad is not None) for p in bucket], device=device)
    counts = [torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1) for flag in flags]
    flat = torch.cat([*grads, present, *counts])
    dist.all_reduce(flat)
    tail = flat[flat.numel() - len(bucket) - len(counts) :].tolist()  # one device-to-host copy
    reached, sums = tail[: len(bucket)], [round(total) for total in tail[len(bucket) :]]
    flat /= world_size()
    offset = 0
    for param, anywhere in zip(bucket, reached, strict=True):
        mean = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
        if not anywhere:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad.copy_(mean)
    return sums


def all_reduce_sum(values: list[int]) -> list[int]:
    """Element-wise sums of small integer counters over ranks (identical on every rank)."""
    if not is_initialized() or world_size() == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.long, device=_collective_device())
    dist.all_reduce(total)
    return [int(v) for v in total.tolist()]


def _collective_device() -> torch.device:
    """Where collectives run: the current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_gather_rows(rows: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's ``rows`` [n_r, ...] concatenated along dim 0 in rank order, on every rank.

    No gradient. Ranks may hold different numbers of rows, or none (``None``: a rank whose
    share of an evaluation set was empty); rows are padded for the collective and the padding
    is dropped. Returns ``None`` when no rank holds a tensor. The result is on ``rows``'
    device (the CPU where this rank had none).
    """
    if not is_initialized() or world_size() == 1:
        return rows
    shape = None if rows is None else (tuple(rows.shape), rows.dtype)
    shapes = all_gather_object(shape)
    known = [s for s in shapes if s is not None]
    if not known:
        return None
    tail, dtype = known[0][0][1:], known[0][1]
    if any(s[0][1:] != tail or s[1] != dtype for s in known):
        raise ValueError(f"all_gather_rows: ranks hold rows of different shapes or dtypes: {shapes}")
    sizes = [0 if s is None else s[0][0] for s in shapes]
    home = rows.device if rows is not None else torch.device("cpu")
    device = _collective_device()
    padded = torch.zeros((max(sizes), *tail), dtype=dtype, device=device)
    if rows is not None:
        padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(home)


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def broadcast_module_(module: torch.nn.Module, source: int = 0) -> None:
    """Rank ``source``'s parameters and buffers on every rank (identical starting weights)."""
    if not is_initialized() or world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=source)


def all_gather_object(value: R) -> list[R]:
    """Every rank's ``value``, in rank order (a list of one without a process group)."""
    if not is_initialized() or world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: R, source: int = 0, patient: bool = False) -> R:
    """Rank ``source``'s value on every rank (e.g. the run folder).

    ``patient``: ``source`` computes the value first, for longer than the process-group timeout may
    allow (rank 0's linear-probe fit): the others wait in a gloo group without that limit. A rank that
    dies meanwhile is still named within minutes by :func:`ranks_watched`."""
    if not is_initialized() or world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source, group=patient_group() if patient else None)
    return box[0]


PATIENT_TIMEOUT = datetime.timedelta(hours=24)  # a wait on one rank's CPU work (see broadcast_object)
_patient: tuple[Any, Any] | None = None  # (the default group it was made in, the patient group)


def patient_group() -> Any:
    """A gloo group over every rank whose collectives wait :data:`PATIENT_TIMEOUT` (None without a
    process group). Made on first use, a collective itself: call it on every rank together, before
    the long work (as ``vlhub.eval.linear_probe.probe_metrics`` does)."""
    global _patient
    if not is_initialized() or world_size() == 1:
        return None
    world = dist.group.WORLD
    if _patient is None or _patient[0] is not world:  # a new process group: a new patient group
        _patient = (world, dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT))
    return _patient[1]
