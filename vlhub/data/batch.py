"""The Batch every data source produces, and a sample before collation (counted by vlhub.engine.guard)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypedDict

import numpy as np
import torch
from PIL import Image


class Batch(TypedDict, total=False):
    """Fixed keys; which are present depends on what the objective asked for.

    Labels from captions (``label_from_caption``, :mod:`vlhub.data.captions`): every row names
    at least one class of ``classes``. ``label`` is that class when the row names exactly one,
    else -1; ``labels`` marks every class the row names, so the loss averaged over a row's classes
    is ``-(labels * log_softmax(logits)).sum(1) / labels.sum(1)``. With ``single`` or ``strict``
    matching no row names several, and ``label`` alone is enough.
    """

    image: torch.Tensor  # [B, 3, H, W]: uint8 from the training loader, normalised float on the device
    image_view2: torch.Tensor  # [B, 3, H, W]: the first extra view (augment_views), likewise; see IMAGE_KEYS
    image_view3: torch.Tensor  # [B, 3, H, W]: the second extra view, likewise
    text: torch.Tensor  # [B, L] token ids
    label: torch.Tensor  # [B] int64 class index (-1 when the source has none, or the row has several)
    labels: torch.Tensor  # [B, C] float multi-hot, only with data.label_from_caption (see below)
    text_raw: list[str]
    sample_id: torch.Tensor  # [B] int64: the sample's position in the global stream (unique, deterministic)


@dataclass
class RawSample:
    """One decoded sample from a source, before transforms."""

    image: Image.Image
    caption: str
    label: int = -1


class Filtered:
    """A sample whose caption names no class of ``classes``: dropped and counted, never bad."""

    def __init__(self, caption: str) -> None:
        self.caption = caption


class BadSample(Exception):
    """A sample that cannot be used (unreadable image, empty caption). It is skipped and counted."""


def batch_size_of(batch: Batch) -> int:
    return int(batch["image"].shape[0])


def stack_images(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(views)``, the same values and layout; CPU uint8 views of one shape (the training
    transforms' ``[3, H, W]``, permuted views of ``[H, W, 3]`` pixels) are copied by numpy, whose strided
    uint8 copy is about twice torch's (benchmarks/data_pipeline.py --profile: collate)."""
    first = views[0]
    if not all(v.dtype == torch.uint8 and v.device.type == "cpu" and v.shape == first.shape for v in views):
        return torch.stack(list(views))
    out = torch.empty((len(views), *first.shape), dtype=torch.uint8)
    np.stack([view.numpy() for view in views], out=out.numpy())
    return out


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of every key (the gradient cache runs chunks of a batch)."""
    return {key: value[start:stop] for key, value in batch.items()}  # type: ignore[return-value]


# The image views a batch may carry, in the order they are drawn from the sample's seeded generator:
# the base view ``image`` (the run's ``augment``, the view every image-text term sees) first, then the
# extra views of self-supervised terms (``augment_views``). Each view is its own key, so slicing (the
# gradient cache), moving and normalising (``move_batch``) and DDP treat every view alike.
IMAGE_KEYS = ("image", "image_view2", "image_view3")


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` to normalised float32, with ``ToTensor`` + ``Normalize``'s arithmetic
    (``x.float() / 255``, then ``(x - mean) / std``), so the result equals theirs bit for bit."""
    images = images.to(torch.float32).div_(255)
    mean_t, std_t = _channel_stats(tuple(mean), tuple(std), images.device)
    return images.sub_(mean_t).div_(std_t)


@functools.lru_cache(maxsize=8)
def _channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as [C, 1, 1] float32 tensors on ``device``, made once: building them per
    batch would copy from pageable host memory, which waits for the device, in every training step."""
    as_tensor = functools.partial(torch.as_tensor, dtype=torch.float32, device=device)
    return as_tensor(mean).view(-1, 1, 1), as_tensor(std).view(-1, 1, 1)


def move_batch(
    batch: Batch,
    device: torch.device,
    dtype: torch.dtype | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Batch:
    """Every tensor to ``device`` (asynchronously from pinned memory); float tensors to ``dtype``.

    uint8 images (training transforms stop before ``ToTensor``) travel as uint8 and are
    converted and normalised here, on the device, with ``mean``/``std`` (the model's), in
    float32 and then cast to ``dtype``: the same values as normalising on the host.
    """
    moved: dict = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key in IMAGE_KEYS and value.dtype == torch.uint8:
                if mean is None or std is None:
                    raise ValueError(f"batch[{key!r}] is uint8: move_batch needs the model's mean and std")
                value = normalize_images(value, mean, std)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved  # type: ignore[return-value]


@dataclass
class LoadedBatch:
    batch: Batch
    samples_read: int
    bad_samples: int
    bad_reasons: list[str] = field(default_factory=list)
    epoch: int = 0
    filtered: int = 0  # samples dropped by caption filtering (not bad, not in the batch)

    def pin_memory(self) -> LoadedBatch:
        """Called by DataLoader(pin_memory=True): the batch's tensors (and encoded images' finished rows,
        ``vlhub.data.device_decode``) in page-locked memory."""
        batch = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in self.batch.items()}
        return replace(self, batch=batch)  # type: ignore[arg-type]


def check_bad_input_keys(
    max_bad_fraction: float, bad_fraction_min_samples: int, max_empty_batches: int, max_image_pixels: int | None
) -> None:
    """The bad-input keys every data source shares (``configs/data/shared/bad_input.yaml``)."""
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    if bad_fraction_min_samples < 0:
        raise ValueError(f"bad_fraction_min_samples must be >= 0, got {bad_fraction_min_samples}")
    if max_empty_batches < 0:
        raise ValueError(f"max_empty_batches must be >= 0, got {max_empty_batches}")
    if max_image_pixels is not None and max_image_pixels <= 0:
        raise ValueError(f"max_image_pixels must be > 0 or null, got {max_image_pixels}")
