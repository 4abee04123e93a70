"""Remote shards read through, in lanes: one lane per DataLoader worker (``vlhub.data.stream``).

Shards without a known sample count (``pipe:``, URLs) cannot be positioned by count, so each worker
reads its own lane of shards through a seeded shuffle buffer, and resuming reads the lane up to the
position (images are not decoded). The layout depends on ``workers``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence

from vlhub.data.batch import BadSample
from vlhub.data.captions import CaptionPipeline
from vlhub.data.shards import ShardSet, read_shard


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
    """A lane's samples from one source; a source whose shards yield nothing fails (never a silent hang)."""
    empty, limit = 0, (4 * len(shards.urls) + 8) if resampled else len(shards.urls)
    for url in shard_order(shards, index, seed, epoch, lane, lanes, resampled):
        read = 0
        for read, sample in enumerate(read_shard(url, shards.sizes.get(url) if shards.sizes else None), 1):  # noqa: B007
            yield sample
        empty = 0 if read else empty + 1
        if empty >= limit:
            raise ValueError(f"data source {shards.name!r}: {empty} shards in a row hold no sample ({url} the last)")


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
