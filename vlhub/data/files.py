"""File-backed sources: a CSV of (image path, caption[, label]) and an ImageFolder.

Both check their inputs when built, before any training: a missing file or folder, or a CSV
without the named columns, fails naming what is wrong. Per-sample faults (an unreadable or
missing image, an empty caption) raise ``BadSample`` and are skipped and counted downstream.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from PIL import Image

from vlhub.data.batch import BadSample, RawSample
from vlhub.data.sources import PairSource
from vlhub.registry import DATASETS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def read_image(path: Path) -> Image.Image:
    """An RGB image. An RGB JPEG comes back opened but not decoded (from its bytes in memory),
    so the training transform can decode it at a reduced scale (``augment.draft``); decoding
    it later gives the same pixels. A JPEG corrupt past its header is then caught where it is
    decoded (the loader counts it as a bad sample)."""
    try:
        image = Image.open(io.BytesIO(path.read_bytes()))
        if image.format == "JPEG" and image.mode == "RGB":
            return image
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise BadSample(f"unreadable image {path}: {error}") from error


def _read_rows(path: Path, separator: str) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        if len(separator) == 1:
            rows = [row for row in csv.reader(handle, delimiter=separator) if row]  # blank lines: none
        else:
            rows = [line.rstrip("\n").split(separator) for line in handle if line.strip()]
    if not rows:
        raise ValueError(f"data.root={path} is empty: expected a header row")
    return rows[0], rows[1:]


@DATASETS.register("csv")
class CsvPairs(PairSource):
    """Rows of a CSV: image path (relative to the CSV's folder), caption, optional int label."""

    def __init__(
        self,
        root: str,
        image_key: str = "filepath",
        caption_key: str = "title",
        label_key: str | None = None,
        separator: str = ",",
        workers: int = 0,
        max_bad_fraction: float = 0.1,
        val: PairSource | None = None,
        **captions: Any,
    ) -> None:
        super().__init__(workers, max_bad_fraction, val, **captions)
        path = Path(root)
        if not path.is_file():
            raise FileNotFoundError(f"data.root={root}: no such CSV file")
        header, rows = _read_rows(path, separator)
        wanted = {"data.image_key": image_key, "data.caption_key": caption_key}
        if label_key is not None:
            wanted["data.label_key"] = label_key
        missing = [f"{key}={column!r}" for key, column in wanted.items() if column not in header]
        if missing:
            raise ValueError(
                f"{path}: column(s) {', '.join(missing)} not in the header (separator {separator!r}); "
                f"columns found: {header}"
            )
        image_col, caption_col = header.index(image_key), header.index(caption_key)
        label_col = header.index(label_key) if label_key is not None else None
        folder = path.parent
        self.image_paths: list[Path] = []
        self.captions: list[str] = []
        self.labels: list[int] = []
        for line, row in enumerate(rows, start=2):
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            self.image_paths.append(folder / row[image_col])
            self.captions.append(row[caption_col])
            if label_col is not None:
                try:
                    self.labels.append(int(row[label_col]))
                except ValueError:
                    raise ValueError(f"{path}:{line}: label {row[label_col]!r} is not an integer") from None
        if not self.image_paths:
            raise ValueError(f"{path} has a header but no rows")

    @property
    def num_classes(self) -> int | None:
        return max(self.labels) + 1 if self.labels else None

    def __len__(self) -> int:
        return len(self.image_paths)

    def caption(self, index: int) -> str:
        return self.captions[index]

    def load(self, index: int) -> RawSample:
        caption = self.captions[index].strip()
        if not caption:
            raise BadSample(f"empty caption for {self.image_paths[index]}")
        image = read_image(self.image_paths[index])
        return RawSample(image=image, caption=caption, label=self.labels[index] if self.labels else -1)


def _read_class_names(path: str | None, count: int, folders: list[str]) -> list[str]:
    if path is None:
        return [name.replace("_", " ") for name in folders]
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) != count:
        raise ValueError(f"class-name file {path} has {len(names)} names for {count} class folders")
    return names


@DATASETS.register("imagefolder")
class ImageFolderPairs(PairSource):
    """``root/<class>/<image>``; label = sorted folder index, caption = template(class name)."""

    def __init__(
        self,
        root: str,
        caption_template: str = "a photo of a {}.",
        class_names_file: str | None = None,
        workers: int = 0,
        max_bad_fraction: float = 0.1,
        val: PairSource | None = None,
        **captions: Any,
    ) -> None:
        super().__init__(workers, max_bad_fraction, val, **captions)
        folder = Path(root)
        if not folder.is_dir():
            raise FileNotFoundError(f"data.root={root}: no such folder (expected one folder per class)")
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if not classes:
            raise ValueError(f"data.root={root} has no class folders")
        if "{}" not in caption_template:
            raise ValueError(f"data.caption_template must contain '{{}}', got {caption_template!r}")
        self.class_names = _read_class_names(class_names_file, len(classes), classes)
        self.caption_template = caption_template
        self.samples: list[tuple[Path, int]] = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((folder / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"data.root={root}: no images with extensions {IMAGE_EXTENSIONS}")

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int) -> str:
        return self.caption_template.format(self.class_names[self.samples[index][1]])

    def load(self, index: int) -> RawSample:
        path, label = self.samples[index]
        caption = self.caption_template.format(self.class_names[label])
        return RawSample(image=read_image(path), caption=caption, label=label)
