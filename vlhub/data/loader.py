"""The training stream: a resumable loader over any PairSource, positioned by sample.

Samples are laid out on one global line of *slots*: slot s is sample ``perm_e[s % N]`` of
epoch ``e = s // N``, where ``perm_e`` is a permutation seeded by (seed, e). Starting at slot
S, the k-th batch of rank r takes slots ``S + [(k*W + r)*B, (k*W + r + 1)*B)``. Augmentation
randomness is seeded by the slot, and the slot is the batch's ``sample_id``. So what a batch
holds depends only on (seed, position, rank), never on when a loader was created: resuming at
the saved position gives bit-identical batches, and W ranks at batch B see the same samples as
one process at batch W*B. Streamed shards (``vlhub.data.stream``) reuse the per-sample transform
and the collation below, with their own positions.

Captions go through the source's :class:`~vlhub.data.captions.CaptionPipeline` (transforms seeded
by the slot too). When it filters (``filter_to_classes``, ``label_from_caption``,
``simple``), the slots run over the kept samples only, chosen once from the captions when the
loader is built, so batches stay full and positions stay exact; the counts are logged.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from vlhub.data.batch import IMAGE_KEYS, BadSample, Batch, Filtered, LoadedBatch, RawSample
from vlhub.data.captions import CaptionPipeline
from vlhub.data.device_decode import collate_views
from vlhub.data.images import DECODE_ERRORS

if TYPE_CHECKING:
    from vlhub.data.pair_source import PairSource

ImageTransform = Callable[[object], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]
log = logging.getLogger(__name__)
_PLAIN_CAPTIONS = CaptionPipeline()  # the identity: the caption as the source gave it


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
    raw: RawSample,
    slot: int,
    epoch: int,
    seed: int,
    image_transform: ImageTransform,
    image_views: int,
    captions: CaptionPipeline = _PLAIN_CAPTIONS,
    view_transform: ImageTransform | None = None,
) -> dict | Filtered | BadSample:
    """One decoded sample, its augmentation and caption transforms seeded by its global position ``slot``.

    ``image_views`` views are drawn from one generator seeded by the slot: the base view with
    ``image_transform`` first, then the extra views with ``view_transform`` (default: the same). The
    base view is thus the same whatever else an objective asks for: a job with extra views and a job
    without get bit-identical ``image`` tensors from the same seed.

    JPEGs may be decoded here, by the transform (draft decoding), not by the source: an image that
    fails to decode is a bad sample."""
    caption = captions.prepare(raw.caption, seed * 7_919 + slot)
    if caption is None:
        return Filtered(raw.caption)
    transforms = [image_transform] + [view_transform or image_transform] * (image_views - 1)
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed also queues a CUDA seeding call, which records
        # a stack trace every time (milliseconds per sample) while CUDA is not initialised.
        torch.default_generator.manual_seed(seed * 7_919 + slot)
        try:
            views = draw_views(raw.image, transforms)
        except DECODE_ERRORS as error:
            return BadSample(f"undecodable image (sample at position {slot}): {error}")
    return {"views": views, "caption": caption, "label": raw.label, "epoch": epoch, "slot": slot}


def draw_views(image: Image.Image, transforms: list[ImageTransform]) -> list[torch.Tensor]:
    """Each transform applied to ``image``, in order (the base view first).

    A view drafted from an undecoded JPEG (``augment.draft``) leaves the image decoded at the reduced
    scale; the next view then starts from a fresh copy of the undecoded file, so extra views never see
    the base view's reduced pixels (and the base view is exactly what it is without extra views).
    """
    undecoded = getattr(image, "fp", None)  # open_image's BytesIO until PIL decodes (then fp is None)
    size, views = image.size, []
    for transform in transforms:
        if views and isinstance(undecoded, io.BytesIO) and image.size != size:  # drafted: start again
            image = Image.open(io.BytesIO(undecoded.getvalue()))
        views.append(transform(image))
    return views


def kept_indices(source: PairSource) -> list[int] | None:
    """The indices whose captions the source's caption pipeline keeps (``None``: it keeps all).

    A caption that cannot be read (empty) is kept, so that loading it counts it as a bad sample.
    """
    captions = source.caption_pipeline
    if not captions.filters:
        return None
    kept = []
    for index in range(len(source)):
        text = source.caption(index)
        if not text.strip() or captions.keeps(text):
            kept.append(index)
    log.info(
        "caption filter: kept %d of %d samples (%d dropped: no class of data.classes, strategy %s)",
        len(kept),
        len(source),
        len(source) - len(kept),
        captions.match_strategy,
    )
    if not kept:
        raise ValueError("no caption names a class of data.classes: nothing to train on (check data.classes)")
    return kept


class _SlotDataset(Dataset):
    """Maps a slot to (epoch, index), decodes and transforms with slot-seeded randomness."""

    def __init__(
        self,
        source: PairSource,
        seed: int,
        image_transform: ImageTransform,
        image_views: int,
        view_transform: ImageTransform | None = None,
    ) -> None:
        self.source, self.seed = source, seed
        self.image_transform, self.image_views, self.view_transform = image_transform, image_views, view_transform
        self.indices = kept_indices(source)  # None: every sample
        self.size = len(source) if self.indices is None else len(self.indices)
        self._permutation: tuple[int, torch.Tensor] | None = None

    def position(self, slot: int) -> tuple[int, int]:
        epoch, offset = divmod(slot, self.size)
        if self._permutation is None or self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = (epoch, torch.randperm(self.size, generator=generator))
        index = int(self._permutation[1][offset])
        return epoch, index if self.indices is None else self.indices[index]

    def __getitem__(self, slot: int) -> dict | BadSample:
        epoch, index = self.position(slot)
        try:
            raw = self.source.load(index)
        except BadSample as bad:
            return bad
        return transform_sample(
            raw,
            slot,
            epoch,
            self.seed,
            self.image_transform,
            self.image_views,
            self.source.caption_pipeline,
            self.view_transform,
        )


def check_image_views(image_views: int) -> None:
    """How many views a batch can carry: one key each in ``IMAGE_KEYS``."""
    if not 1 <= image_views <= len(IMAGE_KEYS):
        keys = ", ".join(IMAGE_KEYS)
        raise ValueError(f"image_views must be in [1, {len(IMAGE_KEYS)}] (one key each: {keys}), got {image_views}")


class Collate:
    """Stacks good samples into a :class:`Batch`; bad ones are counted with reasons, filtered ones counted."""

    def __init__(
        self, tokenizer: Tokenizer | None, image_views: int, captions: CaptionPipeline = _PLAIN_CAPTIONS
    ) -> None:
        check_image_views(image_views)
        self.tokenizer, self.image_views, self.captions = tokenizer, image_views, captions

    def __call__(self, items: list) -> LoadedBatch:
        good = [item for item in items if isinstance(item, dict)]
        reasons = [str(item) for item in items if isinstance(item, BadSample)]
        filtered = sum(isinstance(item, Filtered) for item in items)
        batch: Batch = {}
        if good:
            for index, key in enumerate(IMAGE_KEYS[: self.image_views]):  # image, image_view2, image_view3
                # stacked; views left encoded (augment.decode=cuda) become one EncodedImages, in sample order
                batch[key] = collate_views([item["views"][index] for item in good])  # type: ignore[literal-required]
            batch["label"] = torch.tensor([item["label"] for item in good], dtype=torch.long)
            batch["sample_id"] = torch.tensor([item["slot"] for item in good], dtype=torch.long)
            # text_raw and text; with label_from_caption, label and labels from the captions
            batch.update(self.captions.collate([item["caption"] for item in good], self.tokenizer))  # type: ignore[typeddict-item]
        epoch = max((item["epoch"] for item in good), default=0)
        return LoadedBatch(batch, len(items), len(reasons), reasons, epoch, filtered)


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
    pin_memory: bool = False,
    view_transform: ImageTransform | None = None,
) -> DataLoader:
    """An endless loader of :class:`LoadedBatch`, from global slot ``start_sample`` on.

    Each sample carries ``image_views`` views: the base view ``image`` from ``image_transform``, then
    ``image_view2``, ``image_view3`` from ``view_transform`` (default: ``image_transform``).

    ``pin_memory`` (when training on CUDA): batches arrive in page-locked memory, so their copy
    to the device is asynchronous and can overlap the previous step (``vlhub.engine.prefetch``).
    """
    return DataLoader(
        _SlotDataset(source, seed, image_transform, image_views, view_transform),
        batch_sampler=StepBatchSampler(batch_size, start_sample, rank, world_size),
        collate_fn=Collate(tokenizer, image_views, source.caption_pipeline),
        num_workers=source.workers,
        persistent_workers=False,
        pin_memory=pin_memory,
        prefetch_factor=2 if source.workers > 0 else None,
        # Its own generator: creating the iterator must not draw from the global random stream,
        # or a resumed run's dropout would be shifted by one draw.
        generator=torch.Generator().manual_seed(seed),
    )
