"""The training stream over webdataset shards: split by rank, weighted, resumable, one pass an epoch.

Built on the ``webdataset`` package's shard conventions (``vlhub.data.shards``), not on its
``WebDataset`` pipeline nor on ``wids``: ``wids`` reads each sample by random access into every
shard from every rank, and the pipeline's order depends on when workers start. Two layouts:

- **Local shards** (every shard's count known: ``vlhub.data.shard_counts``): the sample at each
  position is a pure function of (seed, position, ranks, batch size), laid out by
  ``vlhub.data.layout``: each rank reads its own contiguous run of each epoch's pass through the
  shards, through a seeded shuffle buffer. Per-rank batch ``k`` is batch ``j = k % N`` of epoch
  ``e = k // N`` (``N = num_samples // (W * B)``, the same on every rank): its samples are outputs
  ``[j * B, (j + 1) * B)`` of the rank's epoch. DataLoader worker ``w`` of ``L`` builds batches
  ``start + w + m * L`` and reads only their samples, by seeking (``vlhub.data.shard_reader``), so
  the worker count changes nothing and may change on resume. Without resampling an epoch reads
  every sample of every shard once across ranks and workers, less the last partial global batch
  (left out, logged at start). Moving to a position costs the shuffle buffer's look-back and one
  header walk per shard touched: no sample before it is read.
- **Remote shards** without counts (``pipe:``, URLs; ``num_samples`` gives the epoch): read
  through, as lanes. Each rank reads ``L = max(1, workers)`` lanes (``G = W * L`` in all;
  lane ``g = rank * L + l``); batch ``k`` is batch ``j = (k % N) // L`` of lane ``l = (k % N) % L``,
  so a worker serves one lane. Epoch ``e`` orders each source's shards by a permutation seeded by
  (seed, e, source); lane ``g`` takes every ``G``-th shard (reading them again, reshuffled, when
  they run out), or draws shards with replacement with ``resampled``. A shuffle buffer of
  ``shuffle_buffer`` raw samples per lane, seeded by (seed, e, g); with several sources each
  sample's source is drawn by weight. Resuming reads the lane up to the position (images are not
  decoded). This layout depends on ``workers``: a change on resume fails naming it.

Captions go through the source's caption pipeline (``vlhub.data.captions``), seeded by the sample's
position; when it filters, a caption naming no class is dropped before batching and counted in
``LoadedBatch.filtered``, so batches stay full and positions count kept samples only (locally, the
``txt`` members before the position are read to find it). A batch's ``sample_id`` is its global
position ``anchor + (k * W + rank) * B + i``; augmentation is seeded by it. What the layout depends
on is :func:`layout_record`, stored in the checkpoint: a resume with other ranks, batch size,
``num_samples``, shards or shuffle buffer fails naming them, except at an epoch boundary,
where the next epoch is laid out anew (the anchor moves there).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlhub.data.batch import BadSample, Filtered, LoadedBatch
from vlhub.data.captions import CaptionPipeline
from vlhub.data.lanes import lane_stream, skip, take
from vlhub.data.layout import StreamLayout, layout_record, resume_anchor
from vlhub.data.loader import Collate, ImageTransform, Tokenizer, transform_sample
from vlhub.data.shard_reader import LocalShards
from vlhub.data.shards import ShardSet, decode_sample

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """This rank's batches ``start_batch, start_batch + 1, ...`` (counted from the anchor), each collated
    in a worker. ``layout``: the positional layout (local shards), else lanes of ``lanes`` per rank."""

    def __init__(
        self,
        sources: Sequence[ShardSet],
        captions: CaptionPipeline,
        tokenizer: Tokenizer | None,
        image_transform: ImageTransform,
        image_views: int,
        *,
        seed: int,
        batch_size: int,
        batches_per_epoch: int,
        start_batch: int,
        rank: int,
        world_size: int,
        lanes: int,
        resampled: bool,
        shuffle_buffer: int,
        max_image_pixels: int | None,
        view_transform: ImageTransform | None = None,
        layout: StreamLayout | None = None,
        anchor: tuple[int, int] = (0, 0),
    ) -> None:
        self.max_image_pixels, self.view_transform = max_image_pixels, view_transform
        self.sources, self.captions = list(sources), captions
        self.collate = Collate(tokenizer, image_views, captions)
        self.image_transform, self.image_views = image_transform, image_views
        self.seed, self.batch_size, self.batches_per_epoch = seed, batch_size, batches_per_epoch
        self.start_batch, self.rank, self.world_size, self.lanes = start_batch, rank, world_size, lanes
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.layout, (self.anchor_epoch, self.anchor_sample) = layout, anchor

    def __iter__(self) -> Iterator[LoadedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self._positions(worker, workers) if self.layout is not None else self._lanes(worker, workers)
        for k, epoch, raws, filtered in batches:
            first = self.anchor_sample + (k * self.world_size + self.rank) * self.batch_size
            loaded = self.collate([self._prepare(raw, first + i, epoch) for i, raw in enumerate(raws)])
            loaded.filtered += filtered
            yield loaded

    def _positions(self, worker: int, workers: int) -> Iterator[tuple[int, int, list, int]]:
        layout, size = self.layout, self.batch_size
        assert layout is not None
        counts = {url: n for s in self.sources for url, n in (s.sizes or {}).items()}
        reader, cursor = LocalShards(counts), _Cursor(self, layout)
        try:
            for k in itertools.count(self.start_batch + worker, workers):
                epoch, j = divmod(k, self.batches_per_epoch)
                epoch += self.anchor_epoch
                if not self.captions.filters:
                    places = layout.locate(epoch, self.rank, np.arange(j * size, (j + 1) * size))
                    yield k, epoch, [reader.sample(url, index) for url, index in places], 0
                else:
                    places, filtered = cursor.batch(reader, epoch, j)
                    yield k, epoch, [reader.sample(url, index) for url, index in places], filtered
        finally:
            reader.close()

    def _lanes(self, worker: int, workers: int) -> Iterator[tuple[int, int, list, int]]:
        current: tuple[int, int] | None = None
        samples: Iterator = iter(())
        for k in itertools.count(self.start_batch + worker, workers):
            epoch, in_epoch = divmod(k, self.batches_per_epoch)
            epoch += self.anchor_epoch
            lane, j = in_epoch % self.lanes, in_epoch // self.lanes
            if current != (epoch, lane):  # a new epoch (or the first batch): open the lane, skip to batch j
                current = (epoch, lane)
                global_lane, all_lanes = self.rank * self.lanes + lane, self.world_size * self.lanes
                samples = lane_stream(
                    self.sources, self.seed, epoch, global_lane, all_lanes, self.resampled, self.shuffle_buffer
                )
                skip(samples, j * self.batch_size, self.captions)
            raws, filtered = take(samples, self.batch_size, self.captions)
            yield k, epoch, raws, filtered

    def _prepare(self, raw: dict | BadSample, slot: int, epoch: int) -> dict | BadSample | Filtered:
        if isinstance(raw, BadSample):
            return raw
        try:
            sample = decode_sample(raw, self.max_image_pixels)
        except BadSample as bad:
            return bad
        return transform_sample(
            sample, slot, epoch, self.seed, self.image_transform, self.image_views, self.captions, self.view_transform
        )


class _Cursor:
    """With caption filtering: where the rank's ``B * j``-th kept sample of an epoch is, found by reading
    the captions (``txt`` members only) of the outputs before it; kept between a worker's batches."""

    CHUNK = 256

    def __init__(self, stream: ShardStream, layout: StreamLayout) -> None:
        self.stream, self.layout = stream, layout
        self.epoch, self.output, self.kept = -1, 0, 0
        self.warned = False

    def _outputs(self, reader: LocalShards, epoch: int) -> Iterator[tuple[tuple[str, int], bool]]:
        per_rank, captions = self.layout.per_rank, self.stream.captions
        while True:
            start = self.output
            if start >= per_rank and not self.warned:
                self.warned = True
                log.warning(
                    "caption filter: epoch %d of rank %d keeps too few samples: reading it again",
                    epoch,
                    self.stream.rank,
                )
            outputs = np.arange(start, start + self.CHUNK) % per_rank
            for place in self.layout.locate(epoch, self.stream.rank, outputs):
                text = reader.caption(*place)
                decoded = text.decode("utf-8", errors="replace") if text is not None else ""
                self.output += 1
                yield place, not decoded.strip() or captions.keeps(decoded)  # empty: kept, counted bad

    def batch(self, reader: LocalShards, epoch: int, j: int) -> tuple[list[tuple[str, int]], int]:
        size = self.stream.batch_size
        if epoch != self.epoch or self.kept > j * size:
            self.epoch, self.output, self.kept = epoch, 0, 0
        outputs = self._outputs(reader, epoch)
        while self.kept < j * size:
            self.kept += next(outputs)[1]
        places, filtered = [], 0
        while len(places) < size:
            place, kept = next(outputs)
            if kept:
                places.append(place)
            else:
                filtered += 1
        self.kept += size
        return places, filtered


def _check_sources(
    sources: Sequence[ShardSet], num_samples: int, batch_size: int, world_size: int, lanes: int, resampled: bool
) -> tuple[int, bool]:
    """(batches per rank and epoch, whether the positional layout applies), or an error naming the key."""
    for source in sources:
        if source.sizes is not None and not any(source.sizes.values()):
            raise ValueError(f"data source {source.name!r}: its {len(source.urls)} shards hold no samples")
    batches_per_epoch = num_samples // (batch_size * world_size)
    if batches_per_epoch < 1:
        raise ValueError(
            f"data.num_samples={num_samples} is less than one global batch "
            f"(trainer.batch_size={batch_size} x {world_size} ranks)"
        )
    positional = all(source.sizes is not None for source in sources)
    if not positional and not resampled:
        for source in sources:
            if len(source.urls) < world_size * lanes:
                raise ValueError(
                    f"data source {source.name!r} has {len(source.urls)} remote shards, fewer than ranks x workers = "
                    f"{world_size} x {lanes}: each reader needs its own shards; write more shards, "
                    "lower data.workers or set data.resampled=true"
                )
    return batches_per_epoch, positional


def _positional(
    sources: Sequence[ShardSet],
    seed: int,
    shape: tuple[int, int, int, int],
    resampled: bool,
    whole_passes: bool,
    filtering: bool,
    main: bool,
) -> StreamLayout:
    """The layout of local shards; says once what an epoch leaves out."""
    world_size, batch_size, batches_per_epoch, shuffle_buffer = shape
    layout = StreamLayout(
        sources, seed, world_size, batch_size, batches_per_epoch, shuffle_buffer, resampled, whole_passes, filtering
    )
    if main and whole_passes and not resampled and layout.left_out():
        log.info(
            "each epoch reads %d samples and leaves out %d of the pass (the last partial global batch of %d)",
            batches_per_epoch * batch_size * world_size,
            layout.left_out(),
            batch_size * world_size,
        )
    return layout


def build_stream_loader(
    sources: Sequence[ShardSet],
    captions: CaptionPipeline,
    num_samples: int,
    workers: int,
    resampled: bool,
    shuffle_buffer: int,
    max_image_pixels: int | None,
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
    layout: dict | None = None,
    whole_passes: bool = False,
) -> DataLoader:
    """An endless loader of this rank's :class:`LoadedBatch` from global position ``start_sample``
    (``image_views`` and ``view_transform``: as :func:`vlhub.data.loader.build_train_loader`).
    ``layout``: the checkpoint's :func:`layout_record` (with its anchor); the loader's own is its
    ``layout`` attribute. ``whole_passes``: the epoch is the shards' count (one pass an epoch)."""
    lanes, global_batch = max(1, workers), batch_size * world_size
    batches_per_epoch, positional = _check_sources(sources, num_samples, batch_size, world_size, lanes, resampled)
    settings = {"world_size": world_size, "batch_size": batch_size, "shuffle_buffer": shuffle_buffer}
    record = layout_record(
        sources, num_samples, **settings, resampled=resampled, **({} if positional else {"lanes": lanes})
    )
    anchor = resume_anchor(record, layout, start_sample)
    if (start_sample - anchor[1]) % global_batch:
        log.warning(
            "resuming at sample %d, not a multiple of the global batch %d: the shard stream restarts at the "
            "batch before it (exact resume needs the same ranks and batch size)",
            start_sample,
            global_batch,
        )
    stream_layout = None
    if positional:
        shape = (world_size, batch_size, batches_per_epoch, shuffle_buffer)
        stream_layout = _positional(sources, seed, shape, resampled, whole_passes, captions.filters, rank == 0)
    stream = ShardStream(
        sources,
        captions,
        tokenizer,
        image_transform,
        image_views,
        seed=seed,
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        start_batch=(start_sample - anchor[1]) // global_batch,
        rank=rank,
        world_size=world_size,
        lanes=lanes,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        max_image_pixels=max_image_pixels,
        view_transform=view_transform,
        layout=stream_layout,
        anchor=anchor,
    )
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
    loader.layout = {  # type: ignore[attr-defined]
        **record,
        "batches_per_epoch": batches_per_epoch,
        "anchor_epoch": anchor[0],
        "anchor_sample": anchor[1],
    }
    return loader
