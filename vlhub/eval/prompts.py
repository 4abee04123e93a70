"""What zero-shot classifiers are built from: class names, templates, and shared name transforms.

ImageNet's class names and OpenAI's templates come from ``open_clip.zero_shot_metadata`` (one
copy of published data, not two); the other datasets' published templates are package data
(``vlhub/resources/zeroshot_templates.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from open_clip import zero_shot_metadata

from vlhub.data.caption_transforms import caesar_shift  # the one cipher: training captions use it too

# ``templates`` names; anything else is read as a file of one template per line.
TEMPLATE_SETS = ("openai", "simple")


def read_resource_lines(name: str) -> list[str]:
    text = resources.files("vlhub.resources").joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_index_list(name: str) -> list[int]:
    """ImageNet-1k class indices from a package text file, one per line."""
    return [int(line) for line in read_resource_lines(name)]


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids; sorted, so position = class index."""
    return tuple(read_resource_lines("imagenet_wnids.txt"))


def imagenet_class_names() -> list[str]:
    """OpenAI's 1000 ImageNet class names (two pairs repeat: 'missile', 'sunglasses')."""
    return list(zero_shot_metadata.IMAGENET_CLASSNAMES)


def openai_imagenet_templates() -> list[str]:
    # open_clip stores templates as lambdas; formatting with '{}' turns them back into strings.
    return [template("{}") for template in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]


def simple_templates() -> list[str]:
    """open_clip's 7-template ensemble (SIMPLE_IMAGENET_TEMPLATES); generic enough for any dataset."""
    return [template("{}") for template in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES]


@cache
def _published_templates() -> dict[str, list[str]]:
    text = resources.files("vlhub.resources").joinpath("zeroshot_templates.json").read_text(encoding="utf-8")
    return {key: value for key, value in json.loads(text).items() if not key.startswith("_")}


def published_templates(dataset: str) -> list[str]:
    """The per-dataset templates published with CLIP (as CLIP_benchmark ships them)."""
    table = _published_templates()
    if dataset not in table:
        raise KeyError(f"no published templates for {dataset!r}; known: {', '.join(sorted(table))}")
    return list(table[dataset])


def check_templates(templates: list[str], where: str) -> list[str]:
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"{where}: every template needs a '{{}}' for the class name; got {bad or 'none'}")
    return list(templates)


def read_template_file(path: str, key: str = "templates") -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{key}={path}: not one of {'|'.join(TEMPLATE_SETS)} and no such file (expected one template per line)"
        )
    return check_templates([line.strip() for line in file.read_text().splitlines() if line.strip()], f"{key}={path}")


def resolve_templates(choice: str, published: list[str]) -> list[str]:
    """``openai``: the dataset's published set; ``simple``: the 7-template ensemble; else a file."""
    if choice == "openai":
        return list(published)
    if choice == "simple":
        return simple_templates()
    return read_template_file(choice)


@dataclass(frozen=True)
class ClassNameTransform:
    """Applied to class names before templating (probing what the text tower reads)."""

    case: str | None = None  # None | one of CASES
    shift_cipher: int | None = None  # Caesar shift of letters by k

    CASES = {"upper": str.upper, "lower": str.lower}

    def __post_init__(self) -> None:
        if self.case is not None and self.case not in self.CASES:
            raise ValueError(f"case must be None or one of {', '.join(self.CASES)}; got {self.case!r}")
        if self.shift_cipher is not None and not isinstance(self.shift_cipher, int):
            raise ValueError(f"shift_cipher must be null or an integer; got {self.shift_cipher!r}")

    def apply(self, names: list[str]) -> list[str]:
        if self.case is not None:
            names = [self.CASES[self.case](name) for name in names]
        if self.shift_cipher:
            names = [caesar_shift(name, self.shift_cipher) for name in names]
        return list(names)
