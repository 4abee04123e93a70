"""Webdataset shards: the shard spec, epoch sizes, reading a tar into samples, decoding a sample.

A shard spec is a brace pattern (``/data/shard-{000000..000009}.tar``); several sources are
joined by ``::``. Every expanded local path must exist when the source is built, and an empty
source fails naming the key. Tar members are grouped into samples by webdataset's own rules
(``webdataset.tariterators``: key = path up to the first dot of the file name, extension = the
rest), so any shard an ordinary ``webdataset.TarWriter`` wrote reads here.

:func:`read_shard` reads a shard through (remote shards, ``vlhub.data.lanes``; local shards are
read by seeking, ``vlhub.data.shard_reader``). Faults inside a shard never stop the stream: a
shard that cannot be opened, or ends early, yields :class:`BadSample` units in place of what
could not be read: as many as the samples lost when its count is known, else one. A sample
without an image or a ``txt``, with an empty caption or an undecodable image is a ``BadSample``
when decoded.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from vlhub.data.batch import BadSample, RawSample
from vlhub.data.images import DEFAULT_MAX_PIXELS, open_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


@dataclass(frozen=True)
class ShardSet:
    """One source of a stream: its shards, its share of the mix, and its size when known."""

    name: str
    urls: tuple[str, ...]
    weight: float = 1.0
    num_samples: int | None = None
    sizes: dict[str, int] | None = None  # samples per shard url (vlhub.data.shard_counts); None: remote


def expand_shards(pattern: str, key: str) -> tuple[str, ...]:
    """Brace-expand one source's pattern; local paths must exist. ``key`` names the setting."""
    if not pattern or not pattern.strip():
        raise ValueError(f"{key}: empty shard pattern")
    urls = tuple(url for url in braceexpand.braceexpand(pattern.strip()) if url)
    if not urls:
        raise ValueError(f"{key}={pattern!r}: the brace expansion is empty")
    missing = [url for url in urls if not url.startswith(REMOTE_PREFIXES) and not Path(url).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{key}={pattern!r}: {len(missing)} of {len(urls)} shards do not exist: {shown}")
    return urls


def split_sources(root: str, key: str = "root") -> list[str]:
    """``a::b`` -> [``a``, ``b``]; an empty piece fails naming ``key``."""
    pieces = root.split("::")
    for index, piece in enumerate(pieces):
        if not piece.strip():
            raise ValueError(f"{key}={root!r}: source {index + 1} of {len(pieces)} (between '::') is empty")
    return pieces


def _lost(url: str, reason: str, read: int, expected: int | None) -> Iterator[BadSample]:
    """One bad unit per sample lost: ``expected - read`` when the size is known (at least one)."""
    lost = max(1, expected - read) if expected is not None else 1
    yield BadSample(reason + (f" ({lost} samples lost)" if lost > 1 else ""))
    for _ in range(lost - 1):
        yield BadSample(f"a sample of shard {url}, lost with it")


def read_shard(url: str, expected: int | None = None) -> Iterator[dict | BadSample]:
    """The samples of one shard, in tar order, as dicts of raw bytes keyed by extension.

    ``expected`` (from ``sizes.json``) lets a shard that ends early count every sample it lost.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as error:  # noqa: BLE001 (any failure to open is a loss, not a crash)
        yield from _lost(url, f"cannot open shard {url}: {error}", 0, expected)
        return
    current: dict | None = None
    read = 0
    try:
        with stream:
            for member in tar_file_iterator(stream):
                key, extension = base_plus_ext(member["fname"])
                if key is None:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    read, current = read + 1, None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[extension.lower()] = member["data"]
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        where = f"in sample {current['__key__']}" if current is not None else "at its start"
        yield from _lost(url, f"shard {url} ends early or is corrupt {where}: {error}", read, expected)
        return
    if current is not None:
        yield current
        read += 1
    if expected is not None and read < expected:  # cut at a sample boundary: tar cannot tell
        yield from _lost(url, f"shard {url} ends early: {read} of {expected} samples (sizes.json)", read, expected)


def decode_sample(raw: dict, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> RawSample:
    """Raw bytes -> a RawSample (RGB image, caption, label from ``cls`` or -1), else BadSample
    (an image over ``max_pixels``, ``max_image_pixels``, included)."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    image_key = next((key for key in IMAGE_KEYS if key in raw), None)
    if image_key is None:
        raise BadSample(f"{where}: no image ({'/'.join(IMAGE_KEYS)}) in {sorted(k for k in raw if k[:2] != '__')}")
    if "txt" not in raw:
        raise BadSample(f"{where}: no txt caption")
    caption = raw["txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        raise BadSample(f"{where}: empty caption")
    label = -1
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode().strip())
        except ValueError:
            raise BadSample(f"{where}: cls {raw['cls'][:20]!r} is not an integer") from None
    # An RGB JPEG stays undecoded, so the training transform can decode it at a reduced scale
    # (augment.draft), as for files; a decode failure there is counted as a bad sample.
    image = open_image(raw[image_key], f"{image_key} of {where}", max_pixels)
    return RawSample(image=image, caption=caption, label=label)
