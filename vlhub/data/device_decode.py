"""JPEG decoding on the training device (``augment.decode=cuda``).

The CPU path decodes every JPEG in a DataLoader worker, so the cores are the ceiling. With device
decoding the worker still draws the crop, from the JPEG's header size and with the same random
numbers as the CPU path (``RandomResizedCropUint8``: torchvision's ``RandomResizedCrop.get_params``
under the sample's slot-seeded generator), but hands over an :class:`EncodedView` (the file's bytes
and the crop box) instead of pixels. Collation keeps a batch's views in sample order as one
:class:`EncodedImages`: the JPEG rows still encoded, the other rows (PNG, WebP, greyscale, CMYK:
anything but an undecoded RGB JPEG) already cropped and resized on the CPU, exactly as without it.

In the main process (never in a worker: CUDA does not survive a fork), :class:`DeviceDecoding` wraps
the loader and turns each batch's ``EncodedImages`` into ``uint8 [B, 3, S, S]`` on the device:
torchvision's batched ``decode_jpeg`` (nvJPEG on CUDA), then each row's crop resized bicubic with
antialiasing. The crops are the CPU path's; the pixels differ by the decoders' IDCT and the resize
kernels (PIL's vs torchvision's), a few grey levels at most. ``move_batch`` normalises them as before.

A JPEG the batched decode refuses is decoded alone, then by PIL on the CPU (the exact path); one that
still fails is dropped from every key of the batch and counted as a bad sample with its reason, as the
CPU path counts it, so ``data.max_bad_fraction`` sees the same counts.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resized_crop

from vlhub.data.batch import IMAGE_KEYS, Batch, LoadedBatch, stack_images
from vlhub.data.images import DECODE_ERRORS, crop_resized

Box = tuple[int, int, int, int]  # top, left, height, width, in the full image's pixels


@dataclass(frozen=True)
class EncodedView:
    """One training view left to the device: the whole JPEG file and the crop drawn on its header size."""

    data: torch.Tensor  # uint8 [N]: the file's bytes
    box: Box
    size: int  # the output's side


@dataclass
class EncodedImages:
    """One image key of a batch, in sample order: rows ``jpeg_rows`` still JPEG (with their crops), rows
    ``finished_rows`` already ``uint8 [3, size, size]`` (stacked in ``finished``, in that order)."""

    size: int
    jpegs: list[torch.Tensor]
    boxes: list[Box]
    jpeg_rows: list[int]
    finished: torch.Tensor
    finished_rows: list[int]

    @classmethod
    def from_views(cls, views: Sequence[torch.Tensor | EncodedView]) -> EncodedImages:
        encoded = [(row, view) for row, view in enumerate(views) if isinstance(view, EncodedView)]
        done = [(row, view) for row, view in enumerate(views) if not isinstance(view, EncodedView)]
        size = encoded[0][1].size
        finished = torch.stack([view for _, view in done]) if done else torch.empty(0, 3, size, size, dtype=torch.uint8)
        return cls(
            size,
            [view.data for _, view in encoded],
            [view.box for _, view in encoded],
            [row for row, _ in encoded],
            finished,
            [row for row, _ in done],
        )

    def __len__(self) -> int:
        return len(self.jpeg_rows) + len(self.finished_rows)

    def pin_memory(self) -> EncodedImages:
        """Called through ``LoadedBatch.pin_memory``: the finished rows in page-locked memory."""
        return replace(self, finished=self.finished.pin_memory())


def collate_views(views: Sequence[torch.Tensor | EncodedView]) -> torch.Tensor | EncodedImages:
    """One image key of a batch: the stacked tensors, or :class:`EncodedImages` when some view is encoded."""
    if any(isinstance(view, EncodedView) for view in views):
        return EncodedImages.from_views(views)
    return stack_images(views)  # type: ignore[arg-type]


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as ``uint8 [3, H, W]`` on ``device``, batched; one the batch refuses is tried alone (None: failed)."""
    if not jpegs:
        return []
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole batched call: find it
        return [_decode_one(data, device) for data in jpegs]


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _on_cpu(data: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """The CPU path's pixels (PIL) for a JPEG the device could not decode; raises what PIL raises."""
    return crop_resized(Image.open(io.BytesIO(data.numpy().tobytes())), box, size)


def decode_images(images: EncodedImages, device: torch.device) -> tuple[torch.Tensor, dict[int, str]]:
    """``uint8 [B, 3, S, S]`` on ``device`` in sample order, and the rows that could not be decoded (row ->
    why; their pixels are left zero)."""
    size = images.size
    pixels = torch.zeros(len(images), 3, size, size, dtype=torch.uint8, device=device)
    if images.finished_rows:
        pixels[images.finished_rows] = images.finished.to(device, non_blocking=True)
    failed: dict[int, str] = {}
    decoded = decode_jpegs(images.jpegs, device)
    for row, data, box, image in zip(images.jpeg_rows, images.jpegs, images.boxes, decoded, strict=True):
        try:
            if image is None:
                pixels[row] = _on_cpu(data, box, size).to(device)
            else:
                pixels[row] = resized_crop(
                    image, *box, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True
                )
        except DECODE_ERRORS as error:
            failed[row] = str(error)
    return pixels, failed


def keep_rows(batch: Batch, keep: list[int]) -> Batch:
    """Rows ``keep`` of every key (tensors and lists alike)."""
    index = torch.tensor(keep, dtype=torch.long)
    kept: dict = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            kept[key] = value[index.to(value.device)]
        else:
            kept[key] = [value[row] for row in keep]
    return kept  # type: ignore[return-value]


def decode_loaded(loaded: LoadedBatch, device: torch.device) -> LoadedBatch:
    """``loaded`` with its encoded image keys decoded on ``device``; rows that cannot be decoded are
    dropped from every key and counted as bad samples, named by their position (``sample_id``)."""
    batch: dict = dict(loaded.batch)
    failed: dict[int, str] = {}
    for key in IMAGE_KEYS:
        if isinstance(batch.get(key), EncodedImages):
            batch[key], failed_here = decode_images(batch[key], device)
            failed.update(failed_here)
    if not failed:
        return replace(loaded, batch=batch)  # type: ignore[arg-type]
    rows = len(batch["image"])
    positions = batch["sample_id"].tolist()
    reasons = [f"undecodable image (sample at position {positions[row]}): {failed[row]}" for row in sorted(failed)]
    keep = [row for row in range(rows) if row not in failed]
    return replace(
        loaded,
        batch=keep_rows(batch, keep) if keep else {},  # type: ignore[arg-type]
        bad_samples=loaded.bad_samples + len(failed),
        bad_reasons=loaded.bad_reasons + reasons,
    )


class DeviceDecoding:
    """The batches of ``loader``, their JPEGs decoded on ``device`` in this (the main) process. Keeps the
    loader's ``layout`` (a shard stream's resume record, read by the trainer)."""

    def __init__(self, loader: Iterable[LoadedBatch], device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.layout = getattr(loader, "layout", None)

    def __iter__(self) -> Iterator[LoadedBatch]:
        for loaded in self.loader:
            yield decode_loaded(loaded, self.device)


def decoding_on(
    make_loader: Callable[..., Iterable[LoadedBatch]], device: torch.device
) -> Callable[..., DeviceDecoding]:
    """``make_loader`` whose loaders decode on ``device`` (``augment.decode=cuda``: ``trainer.device``)."""

    def make(*args, **kwargs) -> DeviceDecoding:
        return DeviceDecoding(make_loader(*args, **kwargs), device)

    return make
