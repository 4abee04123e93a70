"""The training stream: a resumable loader over any PairSource, positioned by sample.

Samples are laid out on one global line of *slots*: slot s is sample ``perm_e[s % N]`` of
epoch ``e = s // N``, where ``perm_e`` is a permutation seeded by (seed, e). Starting at slot
S, the k-th batch of rank r takes slots ``S + [(k*W + r)*B, (k*W + r + 1)*B)``. Augmentation
randomness is seeded by the slot, and the slot is the batch's ``sample_id``. So what a batch
holds depends only on (seed, position, rank), never on when a loader was created: resuming at
the saved position gives bit-identical batches, and W ranks at batch B see the same samples as
one process at batch W*B. Streamed shards (``vlhub.data.stream``) reuse the per-sample transform
and the collation below, with their own positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vlhub.data.batch import BadSample, Batch, LoadedBatch, RawSample

if TYPE_CHECKING:
    from vlhub.data.sources import PairSource

ImageTransform = Callable[[object], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's slots for each global batch, from global slot ``start_sample`` on."""

    def __init__(self, batch_size: int, start_sample: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.batch_size, self.start_sample = batch_size, start_sample
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        step = 0
        while True:
            first = self.start_sample + (step * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            step += 1


def transform_sample(
    raw: RawSample, slot: int, epoch: int, seed: int, image_transform: ImageTransform, image_views: int
) -> dict:
    """One decoded sample, its augmentation seeded by its global position ``slot``."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed also queues a CUDA seeding call, which records
        # a stack trace every time (milliseconds per sample) while CUDA is not initialised.
        torch.default_generator.manual_seed(seed * 7_919 + slot)
        views = [image_transform(raw.image) for _ in range(image_views)]
    return {"views": views, "caption": raw.caption, "label": raw.label, "epoch": epoch, "slot": slot}


class _SlotDataset(Dataset):
    """Maps a slot to (epoch, index), decodes and transforms with slot-seeded randomness."""

    def __init__(self, source: PairSource, seed: int, image_transform: ImageTransform, image_views: int) -> None:
        self.source, self.seed = source, seed
        self.image_transform, self.image_views = image_transform, image_views
        self._permutation: tuple[int, torch.Tensor] | None = None

    def position(self, slot: int) -> tuple[int, int]:
        epoch, offset = divmod(slot, len(self.source))
        if self._permutation is None or self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = (epoch, torch.randperm(len(self.source), generator=generator))
        return epoch, int(self._permutation[1][offset])

    def __getitem__(self, slot: int) -> dict | BadSample:
        epoch, index = self.position(slot)
        try:
            raw = self.source.load(index)
        except BadSample as bad:
            return bad
        return transform_sample(raw, slot, epoch, self.seed, self.image_transform, self.image_views)


class Collate:
    def __init__(self, tokenizer: Tokenizer | None, image_views: int) -> None:
        self.tokenizer, self.image_views = tokenizer, image_views

    def __call__(self, items: list) -> LoadedBatch:
        good = [item for item in items if not isinstance(item, BadSample)]
        reasons = [str(item) for item in items if isinstance(item, BadSample)]
        batch: Batch = {}
        if good:
            batch["image"] = torch.stack([item["views"][0] for item in good])
            if self.image_views > 1:
                batch["image_view2"] = torch.stack([item["views"][1] for item in good])
            batch["label"] = torch.tensor([item["label"] for item in good], dtype=torch.long)
            batch["text_raw"] = [item["caption"] for item in good]
            batch["sample_id"] = torch.tensor([item["slot"] for item in good], dtype=torch.long)
            if self.tokenizer is not None:
                batch["text"] = self.tokenizer(batch["text_raw"])
        epoch = max((item["epoch"] for item in good), default=0)
        return LoadedBatch(batch, len(items), len(reasons), reasons, epoch)


def build_train_loader(
    source: PairSource,
    image_transform: ImageTransform,
    tokenizer: Tokenizer | None,
    batch_size: int,
    seed: int,
    start_sample: int = 0,
    image_views: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """An endless loader of :class:`LoadedBatch`, from global slot ``start_sample`` on."""
    return DataLoader(
        _SlotDataset(source, seed, image_transform, image_views),
        batch_sampler=StepBatchSampler(batch_size, start_sample, rank, world_size),
        collate_fn=Collate(tokenizer, image_views),
        num_workers=source.workers,
        persistent_workers=False,
        prefetch_factor=2 if source.workers > 0 else None,
        # Its own generator: creating the iterator must not draw from the global random stream,
        # or a resumed run's dropout would be shifted by one draw.
        generator=torch.Generator().manual_seed(seed),
    )
