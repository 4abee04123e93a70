"""Base of every map-style data source: decoding by index, plus how it is read.

Every source, map-style or streamed, builds its own training loader with ``build_loader``
(the trainer's loader factory binds that method): a map-style source is read by the slot
loader of ``vlhub.data.loader``, shards by ``vlhub.data.stream``.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, Dataset

from vlhub.data.batch import BadSample, RawSample, check_bad_input_keys
from vlhub.data.captions import CaptionPipeline
from vlhub.data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from vlhub.data.loader import ImageTransform, Tokenizer, build_train_loader


class PairSource(Dataset):
    """A finite, indexable set of (image, caption, label) samples.

    ``load(index)`` decodes one sample or raises :class:`~vlhub.data.batch.BadSample`.
    ``workers`` and the bad-input keys (``max_bad_fraction``, ``bad_fraction_min_samples``,
    ``max_empty_batches``: see :class:`~vlhub.engine.guard.StepGuard`; ``max_image_pixels``:
    see :func:`~vlhub.data.images.open_image`; ``max_image_bytes``: see
    :func:`~vlhub.data.files.read_image`) say how the training stream reads it; ``val`` is an
    optional source of held-out pairs that travels with it (``val``), evaluated with
    open_clip's in-batch validation metrics. The caption keys (``caption_transforms``,
    ``classes``, ``match_strategy``, ``label_from_caption``, ``filter_to_classes``)
    build ``caption_pipeline``, which the loader applies to every caption.
    """

    class_names: list[str] | None = None

    def __init__(
        self,
        workers: int = 0,
        max_bad_fraction: float = 0.1,
        val: PairSource | None = None,
        *,
        bad_fraction_min_samples: int = 500,
        max_empty_batches: int = 20,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_image_bytes: int | None = DEFAULT_MAX_BYTES,
        **captions: Any,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        check_bad_input_keys(max_bad_fraction, bad_fraction_min_samples, max_empty_batches, max_image_pixels)
        self.workers = workers
        self.val = val
        self.max_bad_fraction, self.bad_fraction_min_samples = max_bad_fraction, bad_fraction_min_samples
        self.max_empty_batches, self.max_image_pixels = max_empty_batches, max_image_pixels
        if max_image_bytes is not None and max_image_bytes <= 0:
            raise ValueError(f"max_image_bytes must be > 0 or null, got {max_image_bytes}")
        self.max_image_bytes = max_image_bytes  # image files are read up to this size (vlhub.data.files)
        self.caption_pipeline = CaptionPipeline(**captions)

    @property
    def num_classes(self) -> int | None:
        """How many classes the labels index; None when the source has no labels."""
        return len(self.class_names) if self.class_names else None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> RawSample:
        raise NotImplementedError

    def __getitem__(self, index: int) -> RawSample:
        return self.load(index)

    def caption(self, index: int) -> str:
        """Sample ``index``'s caption (for caption filtering); sources that can, answer without decoding."""
        try:
            return self.load(index).caption
        except BadSample:
            return ""

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
        layout: dict | None = None,  # a shard stream's resume record: nothing to check for map-style slots
    ) -> DataLoader:
        """This rank's endless loader of ``LoadedBatch``, from global position ``start_sample`` on
        (batches in page-locked memory with ``pin_memory``, for a CUDA device); ``image_views`` views
        of each image, the base view from ``image_transform``, the rest from ``view_transform``. A
        source smaller than one global batch is refused: its batches would repeat samples, each its
        own negative."""
        if len(self) < batch_size * world_size:
            raise ValueError(
                f"data: {len(self)} samples are fewer than one global batch (trainer.batch_size={batch_size} x "
                f"{world_size} rank(s)): a batch would hold a sample twice; lower trainer.batch_size or add data"
            )
        return build_train_loader(
            self,
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
        )
