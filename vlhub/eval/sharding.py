"""Sharded evaluation: every rank encodes a contiguous run of whole batches, then results are gathered.

Under a process group every rank calls the evaluator (the trainer does); each encodes its share
of a dataset and the per-sample outputs are gathered in rank order, so every rank holds what one
process would have computed, in the same order. Shares are whole batches of the one-process
batching (the last batch, shorter, stays last), so every image goes through the model in exactly
the batch it would have been in alone: the outputs, and so the metrics, are equal to one
process's bit for bit, not merely close. Without a process group the share is the whole dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch.utils.data import Dataset, Subset

from vlhub.parallel.collectives import all_gather_object, all_gather_rows, all_reduce_sum
from vlhub.parallel.environment import rank, world_size

T = TypeVar("T")


def batch_share(num_items: int, batch_size: int) -> range:
    """This rank's items: a contiguous run of whole batches, the batches dealt out as evenly as they go."""
    batches, ranks, me = -(-num_items // batch_size), world_size(), rank()
    first, last = me * batches // ranks, (me + 1) * batches // ranks
    return range(min(first * batch_size, num_items), min(last * batch_size, num_items))


def dataset_share(dataset: Dataset, batch_size: int) -> Dataset:
    """The part of ``dataset`` this rank encodes (all of it without a process group)."""
    if world_size() == 1:
        return dataset
    return Subset(dataset, batch_share(len(dataset), batch_size))  # type: ignore[arg-type]


def list_share(items: Sequence[T], batch_size: int) -> Sequence[T]:
    """The part of ``items`` (e.g. captions to encode) this rank encodes."""
    share = batch_share(len(items), batch_size)
    return items[share.start : share.stop]


def gather_rows(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """This rank's row blocks, concatenated with every other rank's in rank order (None: no rows anywhere)."""
    return all_gather_rows(torch.cat(parts) if parts else None)


def sum_over_ranks(count: int) -> int:
    return all_reduce_sum([count])[0]


def gather_reps(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-key :func:`gather_rows` of this rank's batches of reps (a rank with no batch learns the keys)."""
    keys = next((list(part) for part in parts), None)
    keys = next((k for k in all_gather_object(keys) if k is not None), None)
    if keys is None:
        raise ValueError("no rows to gather on any rank")
    return {key: gather_rows([part[key] for part in parts]) for key in keys}
