"""The Batch every data source produces, and a sample before collation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch
from PIL import Image


class Batch(TypedDict, total=False):
    """Fixed keys; which are present depends on what the objective asked for."""

    image: torch.Tensor  # [B, 3, H, W]
    image_view2: torch.Tensor  # [B, 3, H, W], second augmented view (SSL objectives)
    text: torch.Tensor  # [B, L] token ids
    label: torch.Tensor  # [B] int64 class index (-1 when the source has none)
    text_raw: list[str]


@dataclass
class RawSample:
    """One decoded sample from a source, before transforms."""

    image: Image.Image
    caption: str
    label: int = -1


class BadSample(Exception):
    """A sample that cannot be used (unreadable image, empty caption). It is skipped and counted."""


BATCH_TENSOR_KEYS = ("image", "image_view2", "text", "label")


def batch_size_of(batch: Batch) -> int:
    return int(batch["image"].shape[0])


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of every key (the gradient cache runs chunks of a batch)."""
    return {key: value[start:stop] for key, value in batch.items()}  # type: ignore[return-value]


def move_batch(batch: Batch, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
    moved: dict = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved  # type: ignore[return-value]
