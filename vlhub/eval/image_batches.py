"""Labelled images of a source, in transformed batches: what every image-side evaluation reads."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from vlhub.data.batch import BadSample
from vlhub.data.images import DECODE_ERRORS
from vlhub.data.pair_source import PairSource
from vlhub.eval.sharding import dataset_share


class _LabelledImages(Dataset):
    def __init__(self, source: PairSource, transform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            sample = self.source.load(index)
            return self.transform(sample.image), sample.label
        except (BadSample, *DECODE_ERRORS):  # the transform decodes JPEGs: a corrupt one fails there
            return None  # skipped and counted by the collate


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [item for item in items if item is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(items)
    images, labels = zip(*good, strict=True)
    return torch.stack(images), torch.tensor(labels), len(items) - len(good)


def iter_labelled_batches(
    source: PairSource, transform, batch_size: int = 256, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(images [b, 3, H, W], labels [b], unreadable images skipped in this batch), in source order.

    Under a process group, only this rank's share of the batches (:mod:`vlhub.eval.sharding`):
    the caller gathers what it computes from them."""
    images = dataset_share(_LabelledImages(source, transform), batch_size)
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    yield from loader
