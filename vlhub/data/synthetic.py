"""Generated coloured shapes with varied captions: the embedded default data set.

Every sample is a pure function of (seed, split, index): a shape of one of ``COLOURS`` and
``SHAPES`` at a random size and position on a textured grey background, with a caption
drawn from several wordings ("a small red triangle on a dark background"). Zero-shot
classes are the (colour, shape) pairs. The set can write itself out as CSV + images or as
an ImageFolder, which is how the file loaders are tested.
"""

from __future__ import annotations

import csv
import math
import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlhub.data.batch import RawSample
from vlhub.data.pair_source import PairSource
from vlhub.registry import DATASETS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 50, 200),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "star")
BACKGROUNDS: dict[str, tuple[int, int]] = {"dark": (15, 70), "grey": (95, 150), "light": (180, 240)}
POSITIONS = {
    "on the left": (0.3, 0.5),
    "on the right": (0.7, 0.5),
    "at the top": (0.5, 0.3),
    "at the bottom": (0.5, 0.7),
    "in the middle": (0.5, 0.5),
}
CAPTION_FORMS = (
    "a {size} {colour} {shape} on a {background} background",
    "a photo of {article} {colour} {shape}",
    "{colour} {shape}, {size}, {position}",
    "there is {article} {colour} {shape} {position}",
    "{article} {size} {shape} coloured {colour}",
    "an image showing {article} {colour} {shape} on {background} grey",
    "{size} {colour} {shape}",
    "a {background} picture with {article} {colour} {shape} {position}",
)
ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.")
SPLIT_SALT = {"train": 0, "val": 1}


def class_names() -> list[str]:
    """Zero-shot class names: every (colour, shape) pair, colour-major."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [
            (
                cx + (r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                cy + (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    if shape == "cross":
        w = r * 0.38
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(shape)


def render_shapes(seed: int, split: str, index: int, image_size: int, num_classes: int) -> RawSample:
    sample_seed = zlib.crc32(f"{seed}/{split}/{index}".encode())
    rng = random.Random(sample_seed)
    label = index % num_classes if split == "val" else rng.randrange(num_classes)
    colour, shape = class_names()[label].split(" ")
    size_word = rng.choice(("small", "large"))
    background = rng.choice(tuple(BACKGROUNDS))
    position = rng.choice(tuple(POSITIONS))

    scale = 2  # draw at twice the size, then downsample: cheap anti-aliasing
    canvas = image_size * scale
    lo, hi = BACKGROUNDS[background]
    grey, sigma = rng.randint(lo, hi), rng.uniform(2, 8)
    # PIL's effect_noise draws from an unseeded C generator: use a seeded numpy one instead.
    noise = np.random.default_rng(sample_seed).normal(grey, sigma, (image_size, image_size))
    image = Image.fromarray(noise.clip(0, 255).astype(np.uint8)).convert("RGB")
    image = image.resize((canvas, canvas), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    radius = canvas * (rng.uniform(0.15, 0.2) if size_word == "small" else rng.uniform(0.26, 0.33))
    px, py = POSITIONS[position]
    cx = canvas * px + rng.uniform(-0.05, 0.05) * canvas
    cy = canvas * py + rng.uniform(-0.05, 0.05) * canvas
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=fill)
    image = image.resize((image_size, image_size), Image.BILINEAR)

    caption = rng.choice(CAPTION_FORMS).format(
        size=size_word,
        colour=colour,
        shape=shape,
        background=background,
        position=position,
        article="an" if colour[0] in "aeiou" else "a",
    )
    return RawSample(image=image, caption=caption, label=label)


@DATASETS.register("synthetic")
class SyntheticShapes(PairSource):
    """``num_samples`` generated samples; ``split="val"`` is the held-out, class-balanced split."""

    def __init__(
        self,
        num_samples: int = 100_000,
        seed: int = 0,
        split: str = "train",
        image_size: int = 32,
        workers: int = 0,
        max_bad_fraction: float = 0.1,
        val: PairSource | None = None,
        **captions: Any,
    ) -> None:
        super().__init__(workers, max_bad_fraction, val, **captions)
        if split not in SPLIT_SALT:
            raise ValueError(f"synthetic split must be one of {sorted(SPLIT_SALT)}, got {split!r}")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.split = split
        self.image_size = image_size
        self.class_names = class_names()
        self.templates = list(ZERO_SHOT_TEMPLATES)

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int) -> RawSample:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return render_shapes(self.seed, self.split, index, self.image_size, len(self.class_names))

    def write_csv(self, folder: str | Path, count: int | None = None, separator: str = ",") -> Path:
        """Write ``count`` samples as PNGs plus ``pairs.csv`` (filepath, title, label)."""
        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        path = folder / "pairs.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter=separator)
            writer.writerow(["filepath", "title", "label"])
            for index in range(count or len(self)):
                sample = self.load(index)
                relative = f"images/{index:06d}.png"
                sample.image.save(folder / relative)
                writer.writerow([relative, sample.caption, sample.label])
        return path

    def write_imagefolder(self, folder: str | Path, count: int | None = None) -> Path:
        """Write ``count`` samples into one folder per class (``red_circle/000001.png``)."""
        folder = Path(folder)
        for index in range(count or len(self)):
            sample = self.load(index)
            class_dir = folder / self.class_names[sample.label].replace(" ", "_")
            class_dir.mkdir(parents=True, exist_ok=True)
            sample.image.save(class_dir / f"{index:06d}.png")
        return folder
