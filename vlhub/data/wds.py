"""Streamed webdataset sources: ``data=wds`` (a shard spec) and ``data=blend`` (a YAML schema).

Both check everything they can before training: every shard path exists, no brace expansion
or ``::`` piece is empty, weights are positive and one per source, and the epoch length is
known (``num_samples``, the schema's ``num_samples``, or each local shard's count:
``vlhub.data.shard_counts``). They are read by the stream of ``vlhub.data.stream``; see there for the order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torch.utils.data import DataLoader

from vlhub.data.batch import check_bad_input_keys
from vlhub.data.captions import CaptionPipeline
from vlhub.data.images import DEFAULT_MAX_PIXELS
from vlhub.data.loader import ImageTransform, Tokenizer
from vlhub.data.pair_source import PairSource
from vlhub.data.shard_counts import shard_counts
from vlhub.data.shards import ShardSet, expand_shards, split_sources
from vlhub.data.stream import build_stream_loader
from vlhub.registry import DATASETS

SCHEMA_KEYS = ("name", "root", "num_samples", "weight")


class ShardSource:
    """Common part of the streamed sources: how they are read and what the trainer asks of them."""

    class_names: list[str] | None = None

    def __init__(
        self,
        sources: Sequence[ShardSet],
        num_samples: int,
        resampled: bool,
        shuffle_buffer: int,
        workers: int,
        max_bad_fraction: float,
        val: PairSource | None,
        *,
        bad_fraction_min_samples: int = 500,
        max_empty_batches: int = 20,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        **captions: Any,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        check_bad_input_keys(max_bad_fraction, bad_fraction_min_samples, max_empty_batches, max_image_pixels)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.sources, self.num_samples = list(sources), num_samples
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.workers, self.max_bad_fraction, self.val = workers, max_bad_fraction, val
        self.bad_fraction_min_samples, self.max_empty_batches = bad_fraction_min_samples, max_empty_batches
        self.max_image_pixels = max_image_pixels
        self.caption_pipeline = CaptionPipeline(**captions)
        self.whole_passes = False  # set by a source whose epoch is its shards' count: one pass an epoch

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.num_samples

    def build_loader(
        self,
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
    ) -> DataLoader:
        """This rank's endless loader of ``LoadedBatch``, from global position ``start_sample`` on
        (batches in page-locked memory with ``pin_memory``, for a CUDA device); ``image_views`` views
        of each image, the base view from ``image_transform``, the rest from ``view_transform``. ``layout``:
        the checkpoint's record of the stream's layout (``vlhub.data.stream``); the loader's is its ``layout``."""
        return build_stream_loader(
            self.sources,
            self.caption_pipeline,
            self.num_samples,
            self.workers,
            self.resampled,
            self.shuffle_buffer,
            self.max_image_pixels,
            image_transform,
            tokenizer,
            batch_size,
            seed,
            start_sample,
            image_views,
            rank,
            world_size,
            pin_memory,
            view_transform,
            layout,
            self.whole_passes,
        )


def _epoch_length(num_samples: int | None, sources: Sequence[ShardSet], key: str) -> int:
    if num_samples is not None:
        if num_samples <= 0:
            raise ValueError(f"{key} must be > 0, got {num_samples}")
        return num_samples
    sizes = [s.num_samples for s in sources]
    if None in sizes:
        unknown = sources[sizes.index(None)].name
        raise ValueError(
            f"{key} is not set and source {unknown!r} has remote shards, which are not counted (local shards "
            f"are): set {key} (samples per epoch), or read local copies"
        )
    return sum(sizes)  # type: ignore[arg-type]


def _with_sizes(name: str, urls: tuple[str, ...], weight: float) -> ShardSet:
    sizes = shard_counts(urls)
    return ShardSet(name, urls, weight, sum(sizes.values()) if sizes is not None else None, sizes)


@DATASETS.register("wds")
class WebDatasetPairs(ShardSource):
    """``root``: a shard spec (brace patterns, sources joined by ``::``), ``weights`` one per source.

    Without ``weights`` the sources are joined into one shard list (webdataset's own reading of
    ``::``); with them, each sample's source is drawn by weight.
    """

    def __init__(
        self,
        root: str,
        weights: list[float] | None = None,
        num_samples: int | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        workers: int = 0,
        max_bad_fraction: float = 0.1,
        val: PairSource | None = None,
        **captions: Any,
    ) -> None:
        patterns = split_sources(root)
        urls = [
            expand_shards(p, f"root (source {i + 1})" if len(patterns) > 1 else "root") for i, p in enumerate(patterns)
        ]
        if weights is None:
            joined = tuple(u for group in urls for u in group)
            sets = [_with_sizes("data.root", joined, 1.0)]  # the name is in stored layouts: kept
        else:
            weights = list(weights)
            if len(weights) != len(patterns):
                raise ValueError(
                    f"weights={weights} has {len(weights)} entries for {len(patterns)} sources in root={root} "
                    "(joined by '::'): give one weight per source"
                )
            check_weights(weights, [f"weights[{i}]" for i in range(len(weights))], "weights")
            sets = [
                _with_sizes(f"data.root source {i + 1}", group, float(w))
                for i, (group, w) in enumerate(zip(urls, weights, strict=True))
            ]
        length = _epoch_length(num_samples, sets, "num_samples")
        super().__init__(sets, length, resampled, shuffle_buffer, workers, max_bad_fraction, val, **captions)
        self.whole_passes = num_samples is None


def check_weights(weights: list[Any], keys: list[str], total_key: str, line: int | None = None) -> None:
    """Each weight a finite number > 0 (not a boolean), and their sum finite: else the sampler
    fails later, in a loader worker, naming nothing the user set. ``line``: where a schema gave it."""
    for weight, key in zip(weights, keys, strict=True):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            at = f" (line {line})" if line else ""
            raise ValueError(f"{key}={weight!r}{at}: a weight must be a finite number > 0")
    if not math.isfinite(sum(float(w) for w in weights)):  # (fsum raises on the overflow instead)
        raise ValueError(f"{total_key}: the weights {weights} sum past the largest float; scale them down")


def _schema_lines(text: str) -> list[dict[str, int]]:
    """For each entry under ``sources:``, the 1-based line of each of its keys (for the messages)."""
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "sources" and isinstance(value, yaml.SequenceNode):
            return [
                {k.value: k.start_mark.line + 1 for k, _ in entry.value} if isinstance(entry, yaml.MappingNode) else {}
                for entry in value.value
            ]
    return []


def read_schema(path: str) -> list[ShardSet]:
    """``sources: [{name, root, num_samples, weight}, ...]`` -> checked shard sets."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"schema={path}: no such file")
    try:
        text = file.read_text()
        document, lines = yaml.safe_load(text) or {}, _schema_lines(text)
    except yaml.YAMLError as error:  # its text carries the line and column, its repr only an object
        mark = getattr(error, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "not YAML"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"schema={path}: {at}: {problem}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"schema={path}: not UTF-8 text ({error})") from None
    entries = document.get("sources") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"schema={path}: expected a non-empty list under 'sources:'")
    sets = []
    for i, entry in enumerate(entries):
        where = f"schema={path}: sources[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not a mapping of {', '.join(SCHEMA_KEYS)}")
        missing = [key for key in SCHEMA_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{where} lacks the key(s) {', '.join(missing)} (each source needs {SCHEMA_KEYS})")
        unknown = sorted(set(entry) - set(SCHEMA_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)}; known: {', '.join(SCHEMA_KEYS)}")
        name, weight, count = str(entry["name"]), entry["weight"], entry["num_samples"]
        line = lines[i].get("weight") if i < len(lines) else None
        check_weights([weight], [f"{where} ({name}).weight"], "", line)
        if not isinstance(count, int) or count <= 0:
            raise ValueError(f"{where} ({name}).num_samples={count!r}: must be an integer > 0")
        urls = expand_shards(str(entry["root"]), f"{where} ({name}).root")
        sets.append(ShardSet(name, urls, float(weight), count, shard_counts(urls)))
    check_weights([s.weight for s in sets], [f"{s.name}.weight" for s in sets], f"schema={path}: sources")
    return sets


@DATASETS.register("blend")
class BlendedShards(ShardSource):
    """Several shard sets mixed by weight, from a schema file (``schema``).

    An epoch is ``num_samples`` when given, else the sum of the sources' ``num_samples``.
    """

    def __init__(
        self,
        schema: str,
        num_samples: int | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        workers: int = 0,
        max_bad_fraction: float = 0.1,
        val: PairSource | None = None,
        **captions: Any,
    ) -> None:
        sets = read_schema(schema)
        length = _epoch_length(num_samples, sets, "num_samples")
        super().__init__(sets, length, resampled, shuffle_buffer, workers, max_bad_fraction, val, **captions)
