"""The training stream over webdataset shards: split by rank and worker, weighted, resumable.

Built on the ``webdataset`` package's tar reader and shard conventions (``vlhub.data.shards``),
not on its ``WebDataset`` pipeline nor on ``wids``. ``wids`` would make the shards map-style
(exact resume for free), but it reads each sample by random access into every shard from every
rank, which is what streamed shards exist to avoid, and it has no resampling or weighted mix.
The pipeline's order depends on when workers start and cannot be positioned. So this module
lays the stream out itself, as a pure function of (seed, position, ranks, workers, batch size):

- **Lanes.** Each rank reads ``L = max(1, data.workers)`` lanes, ``G = W * L`` in all; lane
  ``g = rank * L + l``. Per-rank batch ``k`` belongs to epoch ``e = k // N`` (``N`` = batches per
  rank per epoch = ``num_samples // (W * B)``, the same on every rank, so no rank waits at the
  end of an epoch) and is batch ``j = (k % N) // L`` of lane ``l = (k % N) % L``. DataLoader
  worker ``w`` serves batches ``k = start + w + m * L``, so within an epoch it serves a single
  lane, batch after batch.
- **Shards per lane.** Without resampling, epoch ``e`` orders each source's shards by a
  permutation seeded by (seed, e, source), the same on every rank, and lane ``g`` takes every
  ``G``-th shard from ``g``: ranks and workers read disjoint shards. A lane that runs out before
  the epoch ends reads its own shards again, reshuffled. With ``resampled``, lane ``g`` draws
  shards with replacement from a generator seeded by (seed, e, source, g).
- **Mix.** With several sources each sample's source is drawn by the weights from a generator
  seeded by (seed, e, g): the mix follows the weights whatever the shard counts.
- **Shuffle.** A buffer of ``shuffle_buffer`` raw samples per lane, seeded by (seed, e, g).
- **Captions.** The source's caption pipeline (``vlhub.data.captions``) runs on every caption,
  seeded by the sample's position; when it filters (``data.filter_to_classes``, ...), a caption
  naming no class is dropped before batching and counted in ``LoadedBatch.filtered``, so batches
  stay full and positions count kept samples only.

Resuming at global position ``S`` starts at per-rank batch ``S // (W * B)``: each worker rebuilds
its lane for that epoch and skips the lane's earlier samples *without decoding them* (tar bytes
are read, images are not decoded), so resume costs reading at most one epoch of that lane; set
``data.num_samples`` below the set's size for shorter epochs. A batch's ``sample_id`` is its
global position ``(k * W + rank) * B + i``, the numbering of the map-style slots; augmentation is
seeded by it. Exact resume holds for the same ranks, workers and batch size; "W ranks at batch B
equal one process at W*B" does not hold here (ranks read disjoint shards).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlhub.data.batch import BadSample, Filtered, LoadedBatch
from vlhub.data.captions import CaptionPipeline
from vlhub.data.loader import Collate, ImageTransform, Tokenizer, transform_sample
from vlhub.data.shards import ShardSet, decode_sample, read_shard

log = logging.getLogger(__name__)


def _rng(*parts: object) -> random.Random:
    return random.Random("/".join(map(str, parts)))  # str seeds hash with sha512: stable everywhere


def shard_order(shards: ShardSet, index: int, seed: int, epoch: int, lane: int, lanes: int, resampled: bool):
    """The endless sequence of shard urls lane ``lane`` of ``lanes`` reads from one source."""
    urls = shards.urls
    if resampled:
        rng = _rng(seed, epoch, index, lane, "resample")
        while True:
            yield urls[rng.randrange(len(urls))]
    order = list(range(len(urls)))
    _rng(seed, epoch, index, "order").shuffle(order)
    mine = [urls[i] for i in order[lane::lanes]]
    yield from mine
    for sweep in itertools.count(1):  # the lane ran out before the epoch's end: its own shards again
        _rng(seed, epoch, index, lane, sweep).shuffle(mine)
        yield from mine


def source_samples(shards: ShardSet, index: int, seed: int, epoch: int, lane: int, lanes: int, resampled: bool):
    for url in shard_order(shards, index, seed, epoch, lane, lanes, resampled):
        yield from read_shard(url, shards.sizes.get(url) if shards.sizes else None)


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A seeded shuffle buffer: once full, each new item takes the place of a random one it evicts."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        buffer[slot], item = item, buffer[slot]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def lane_stream(
    sources: Sequence[ShardSet], seed: int, epoch: int, lane: int, lanes: int, resampled: bool, shuffle_buffer: int
) -> Iterator[dict | BadSample]:
    """The raw samples of one lane in one epoch (endless)."""
    streams = [source_samples(s, i, seed, epoch, lane, lanes, resampled) for i, s in enumerate(sources)]
    if len(streams) == 1:
        mixed = streams[0]
    else:
        pick, weights = _rng(seed, epoch, lane, "mix"), [s.weight for s in sources]
        mixed = (next(streams[pick.choices(range(len(streams)), weights)[0]]) for _ in itertools.count())
    if shuffle_buffer > 1:
        return shuffled(mixed, shuffle_buffer, _rng(seed, epoch, lane, "shuffle"))
    return mixed


def _kept(raw: dict | BadSample, captions: CaptionPipeline) -> bool:
    """False for a readable caption the pipeline drops (no image is decoded to know)."""
    if not captions.filters or isinstance(raw, BadSample) or "txt" not in raw:
        return True
    text = raw["txt"].decode("utf-8", errors="replace")
    return not text.strip() or captions.keeps(text)  # an empty caption stays, to be counted bad


def take(samples: Iterator, count: int, captions: CaptionPipeline) -> tuple[list, int]:
    """The next ``count`` kept items of a lane, and how many were filtered out on the way."""
    kept, filtered = [], 0
    while len(kept) < count:
        raw = next(samples)
        if _kept(raw, captions):
            kept.append(raw)
        else:
            filtered += 1
    return kept, filtered


def skip(samples: Iterator, count: int, captions: CaptionPipeline) -> None:
    """Pass ``count`` kept items, holding none of them: tar bytes are read, images never decoded."""
    passed = 0
    while passed < count:
        passed += _kept(next(samples), captions)


class ShardStream(IterableDataset):
    """This rank's batches ``start_batch, start_batch + 1, ...``, each collated in a worker."""

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
    ) -> None:
        self.max_image_pixels, self.view_transform = max_image_pixels, view_transform
        self.sources, self.captions = list(sources), captions
        self.collate = Collate(tokenizer, image_views, captions)
        self.image_transform, self.image_views = image_transform, image_views
        self.seed, self.batch_size, self.batches_per_epoch = seed, batch_size, batches_per_epoch
        self.start_batch, self.rank, self.world_size, self.lanes = start_batch, rank, world_size, lanes
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer

    def __iter__(self) -> Iterator[LoadedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        current: tuple[int, int] | None = None
        samples: Iterator = iter(())
        for k in itertools.count(self.start_batch + worker, workers):
            epoch, in_epoch = divmod(k, self.batches_per_epoch)
            lane, j = in_epoch % self.lanes, in_epoch // self.lanes
            if current != (epoch, lane):  # a new epoch (or the first batch): open the lane, skip to batch j
                current = (epoch, lane)
                samples = lane_stream(
                    self.sources,
                    self.seed,
                    epoch,
                    self.rank * self.lanes + lane,
                    self.world_size * self.lanes,
                    self.resampled,
                    self.shuffle_buffer,
                )
                skip(samples, j * self.batch_size, self.captions)
            first = (k * self.world_size + self.rank) * self.batch_size
            raws, filtered = take(samples, self.batch_size, self.captions)
            loaded = self.collate([self._prepare(raw, first + i, epoch) for i, raw in enumerate(raws)])
            loaded.filtered += filtered
            yield loaded

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
) -> DataLoader:
    """An endless loader of this rank's :class:`LoadedBatch` from global position ``start_sample``
    (``image_views`` and ``view_transform``: as :func:`vlhub.data.loader.build_train_loader`)."""
    lanes, global_batch = max(1, workers), batch_size * world_size
    batches_per_epoch = num_samples // global_batch
    if batches_per_epoch < 1:
        raise ValueError(
            f"data.num_samples={num_samples} is less than one global batch "
            f"(trainer.batch_size={batch_size} x {world_size} ranks)"
        )
    if not resampled:
        for source in sources:
            if len(source.urls) < world_size * lanes:
                raise ValueError(
                    f"data source {source.name!r} has {len(source.urls)} shards, fewer than ranks x workers = "
                    f"{world_size} x {lanes}: each reader needs its own shards; write more shards, "
                    "lower data.workers or set data.resampled=true"
                )
    if start_sample % global_batch:
        log.warning(
            "resuming at sample %d, not a multiple of the global batch %d: the shard stream restarts at the "
            "batch before it (exact resume needs the same ranks and batch size)",
            start_sample,
            global_batch,
        )
    stream = ShardStream(
        sources,
        captions,
        tokenizer,
        image_transform,
        image_views,
        seed=seed,
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        start_batch=start_sample // global_batch,
        rank=rank,
        world_size=world_size,
        lanes=lanes,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        max_image_pixels=max_image_pixels,
        view_transform=view_transform,
    )
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
