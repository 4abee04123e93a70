"""Labelled image files for evaluation, and the checks that make a bad folder fail at build time.

Every eval dataset becomes a :class:`LabelledFiles`: a list of (image path, class id) and its
class names. Targets are known without decoding an image, so a subset can drop images before
any are read. Errors name the folder (the task's ``root=``) and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from vlhub.data.batch import RawSample
from vlhub.data.files import IMAGE_EXTENSIONS, read_image
from vlhub.data.pair_source import PairSource


class RootNotSet(ValueError):
    """A task's ``root`` is None. The ``suite`` preset leaves such tasks out; alone, it is an error."""


def require_root(root: str | None, expected: str) -> Path:
    """The folder at ``root``, or an error naming ``root`` and the expected layout."""
    if root is None:
        raise RootNotSet(f"root=None: not set; give {expected}")
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"root={root}: no such folder (expected {expected})")
    return folder


def require_files(folder: Path, relative: Sequence[str], root: str, expected: str) -> None:
    missing = [name for name in relative if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"root={root}: missing {', '.join(missing)} (expected {expected})")


class LabelledFiles(PairSource):
    """(path, class id) pairs with class names; ``load`` decodes one image (or raises ``BadSample``)."""

    def __init__(self, samples: list[tuple[Path, int]], class_names: list[str]) -> None:
        super().__init__()
        self.samples = samples
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def load(self, index: int) -> RawSample:
        path, label = self.samples[index]
        return RawSample(image=read_image(Path(path)), caption=self.class_names[label], label=label)

    def restrict(self, kept_classes: list[int]) -> LabelledFiles:
        """A new source with only the images of ``kept_classes``, relabelled to their position in it."""
        column = {c: i for i, c in enumerate(kept_classes)}
        samples = [(path, column[label]) for path, label in self.samples if label in column]
        return LabelledFiles(samples, [self.class_names[c] for c in kept_classes])


def _images_in(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        files = [Path(e.path) for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


def scan_class_folders(root: str | None, folders: Sequence[str], expected: str) -> list[tuple[Path, int]]:
    """Images of ``root/<folder>/``, labelled by the folder's position in ``folders``.

    The sub-folders must be exactly ``folders``: a missing or unexpected one is an error, so a
    wrong root (the train split, the parent folder, another dataset) fails before training.
    """
    base = require_root(root, expected)
    found = {entry.name for entry in base.iterdir() if entry.is_dir()}
    missing = [name for name in folders if name not in found]
    unexpected = sorted(found - set(folders))
    if missing or unexpected:
        parts = [f"missing {_preview(missing)}"] if missing else []
        parts += [f"unexpected {_preview(unexpected)}"] if unexpected else []
        raise ValueError(f"root={root}: expected {expected}; {'; '.join(parts)}")
    samples = [(path, label) for label, name in enumerate(folders) for path in _images_in(base / name)]
    if not samples:
        raise ValueError(f"root={root}: no images with extensions {IMAGE_EXTENSIONS} (expected {expected})")
    return samples
