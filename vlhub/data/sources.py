"""Base of every map-style data source: decoding by index, plus how it is read."""

from __future__ import annotations

from torch.utils.data import Dataset

from vlhub.data.batch import RawSample


class PairSource(Dataset):
    """A finite, indexable set of (image, caption, label) samples.

    ``load(index)`` decodes one sample or raises :class:`~vlhub.data.batch.BadSample`.
    ``workers`` and ``max_bad_fraction`` say how the training stream reads it; ``val`` is an
    optional source of held-out pairs that travels with it (``data.val``), evaluated with
    open_clip's in-batch validation metrics.
    """

    class_names: list[str] | None = None

    def __init__(self, workers: int = 0, max_bad_fraction: float = 0.1, val: PairSource | None = None) -> None:
        if workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {workers}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.workers = workers
        self.val = val
        self.max_bad_fraction = max_bad_fraction

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
