"""File-backed sources: a CSV of (image path, caption[, label]) and an ImageFolder.

Both check their inputs when built, before any training: a missing file or folder, or a CSV
without the named columns, fails naming what is wrong. Per-sample faults (an unreadable or
missing image, an empty caption) raise ``BadSample`` and are skipped and counted downstream.
"""

from __future__ import annotations

import csv
import logging
import os
import stat
from pathlib import Path
from typing import Any

from PIL import Image

from vlhub.data.batch import BadSample, RawSample
from vlhub.data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, open_image
from vlhub.data.pair_source import PairSource
from vlhub.registry import DATASETS

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def read_image(
    path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> Image.Image:
    """An RGB image (see :func:`~vlhub.data.images.open_image`), or ``BadSample`` naming ``path``.

    Only a regular file is read, and at most ``max_bytes`` of it (``max_image_bytes``): a row
    naming ``/dev/zero``, a FIFO or a folder, or a path with a NUL byte, is one bad sample with its
    reason, never a hang or an out-of-memory. The file is opened without blocking (a FIFO would
    wait for a writer) and checked through its open handle (nothing can swap it in between)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError) as error:  # missing, no permission, a NUL byte in the path
        raise BadSample(f"unreadable image {str(path)!r}: {error}") from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadSample(f"image {path} is not a regular file (mode {stat.filemode(info.st_mode)}): not read")
        limit = -1 if max_bytes is None else max_bytes + 1
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit)
    except OSError as error:
        raise BadSample(f"unreadable image {path}: {error}") from error
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise BadSample(f"image {path} is over data.max_image_bytes={max_bytes} bytes")
    return open_image(data, f"image {path}", max_pixels)


def _read_rows(path: Path, separator: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (line number, fields) of every non-blank row.

    A byte-order mark is dropped. Bytes that are not UTF-8 are kept as surrogates (Python's
    ``surrogateescape``), so one bad row does not stop the file: :func:`_not_utf8` finds them.
    """
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        if len(separator) == 1:
            reader = csv.reader(handle, delimiter=separator)
            rows = [(reader.line_num, row) for row in reader if row]  # blank lines: none
        else:
            rows = [(n, line.rstrip("\r\n").split(separator)) for n, line in enumerate(handle, 1) if line.strip()]
    if not rows:
        raise ValueError(f"root={path} is empty: expected a header row")
    header = rows[0][1]
    if _not_utf8(header):
        raise ValueError(f"root={path}: the header row is not UTF-8 ({_not_utf8(header)})")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise ValueError(f"root={path}: duplicate column name(s) {duplicates} in the header {header}")
    return header, rows[1:]


def _not_utf8(fields: list[str]) -> str | None:
    """None when every field was valid UTF-8, else a short description of the first bad byte."""
    for column, text in enumerate(fields):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            byte = ord(text[error.start]) - 0xDC00
            return f"byte 0x{byte:02x} in field {column + 1} is not UTF-8"
    return None


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
            raise FileNotFoundError(f"root={root}: no such CSV file")
        header, rows = _read_rows(path, separator)
        wanted = {"image_key": image_key, "caption_key": caption_key}
        if label_key is not None:
            wanted["label_key"] = label_key
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
        self.bad_rows: dict[int, str] = {}  # row index -> why it is skipped (counted as a bad sample)
        for line, row in rows:
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            problem = _not_utf8(row)
            if problem is not None:
                self.bad_rows[len(self.image_paths)] = f"{path}:{line}: row skipped, {problem}"
                row = ["" for _ in row]  # an empty caption: caption filters keep it, loading counts it
            self.image_paths.append(folder / row[image_col])
            self.captions.append(row[caption_col])
            if label_col is not None:
                try:
                    self.labels.append(int(row[label_col]) if problem is None else -1)
                except ValueError:
                    raise ValueError(f"{path}:{line}: label {row[label_col]!r} is not an integer") from None
        if not self.image_paths:
            raise ValueError(f"{path} has a header but no rows")
        if self.bad_rows:
            log.warning("%s: %d row(s) are not UTF-8 and will be skipped as bad samples", path, len(self.bad_rows))

    @property
    def num_classes(self) -> int | None:
        return max(self.labels) + 1 if self.labels else None

    def __len__(self) -> int:
        return len(self.image_paths)

    def caption(self, index: int) -> str:
        return self.captions[index]

    def load(self, index: int) -> RawSample:
        if index in self.bad_rows:
            raise BadSample(self.bad_rows[index])
        caption = self.captions[index].strip()
        if not caption:
            raise BadSample(f"empty caption for {self.image_paths[index]}")
        image = read_image(self.image_paths[index], self.max_image_pixels, self.max_image_bytes)
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
            raise FileNotFoundError(f"root={root}: no such folder (expected one folder per class)")
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if not classes:
            raise ValueError(f"root={root} has no class folders (expected root/<class>/<image>)")
        if "{}" not in caption_template:
            raise ValueError(f"caption_template must contain '{{}}', got {caption_template!r}")
        self.class_names = _read_class_names(class_names_file, len(classes), classes)
        self.caption_template = caption_template
        self.samples: list[tuple[Path, int]] = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((folder / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"root={root}: no images with extensions {IMAGE_EXTENSIONS}")

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int) -> str:
        return self.caption_template.format(self.class_names[self.samples[index][1]])

    def load(self, index: int) -> RawSample:
        path, label = self.samples[index]
        caption = self.caption_template.format(self.class_names[label])
        return RawSample(
            image=read_image(path, self.max_image_pixels, self.max_image_bytes), caption=caption, label=label
        )
