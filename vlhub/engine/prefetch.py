"""Copy the next batch to the device while the current one is being used.

``prefetch(items, device)`` yields the items of ``items`` in order, each with its tensors on
``device``; item k+1's host-to-device copy is issued before item k is handed out. On CUDA the
copy runs on a side stream (from pinned memory it is asynchronous, so it overlaps the work
queued for item k on the compute stream); the compute stream waits for it before the item is
used, and each tensor is recorded on the compute stream so its memory is not reused early.
On CPU the copy is a no-op and the items come through unchanged, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TypeVar

import torch

from vlhub.data.batch import Batch, LoadedBatch

Item = TypeVar("Item", Batch, LoadedBatch)


def _tensors(batch: Batch) -> list[torch.Tensor]:
    return [value for value in batch.values() if isinstance(value, torch.Tensor)]


def _to_device(item: Item, device: torch.device) -> Item:
    batch = item.batch if isinstance(item, LoadedBatch) else item
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return replace(item, batch=moved) if isinstance(item, LoadedBatch) else moved  # type: ignore[return-value]


def prefetch(items: Iterable[Item], device: torch.device) -> Iterator[Item]:
    """``items`` in order, on ``device``, each one's copy overlapping the use of the one before."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def stage(item: Item) -> Item:
        if stream is None:
            return _to_device(item, device)
        with torch.cuda.stream(stream):
            return _to_device(item, device)

    iterator = iter(items)
    try:
        staged = stage(next(iterator))
    except StopIteration:
        return
    while True:
        current = staged
        if stream is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(stream)  # the copy has landed before the step reads it
            for tensor in _tensors(current.batch if isinstance(current, LoadedBatch) else current):
                tensor.record_stream(compute)  # allocated on the side stream, used on this one
        try:
            staged = stage(next(iterator))  # the next copy is queued before this item's work
        except StopIteration:
            yield current
            return
        yield current
