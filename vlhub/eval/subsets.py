"""ImageNet class subsets (``subset``): which classes a task keeps, in which column order.

A subset is a list of ImageNet-1k class indices; its order is the classifier's column order.
A task whose classes carry ImageNet indices (ImageNet and its shifts) keeps the classes in the
subset, ordered by their position in it, drops the images of every other class and remaps
targets to the new columns. For models with their own 1000-way head (``ce``), the same subset
masks the logits outside it (:func:`restrict_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlhub.eval.prompts import read_index_list

# Named subsets shipped as package data; ``subset`` may also be a file of indices.
NAMED_SUBSETS = {"in100": "imagenet_in100_indices.txt"}


@dataclass(frozen=True)
class ClassSubset:
    """``name`` goes into metric keys (``<task>-<name>-zeroshot-top1``); ``indices`` are ImageNet-1k classes."""

    name: str
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(set(self.indices)) != len(self.indices):
            raise ValueError(f"subset={self.name}: repeated class indices")
        bad = [i for i in self.indices if not 0 <= i < 1000]
        if bad or not self.indices:
            raise ValueError(f"subset={self.name}: need ImageNet-1k classes 0..999, got {bad or 'none'}")


def load_subset(choice: str | None) -> ClassSubset | None:
    """``null``, a named subset (``in100``) or a file of ImageNet-1k indices, one per line."""
    if choice is None:
        return None
    if choice in NAMED_SUBSETS:
        return ClassSubset(choice, tuple(read_index_list(NAMED_SUBSETS[choice])))
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(
            f"subset={choice}: not one of {', '.join(NAMED_SUBSETS)} and no such file "
            "(expected ImageNet-1k class indices, one per line)"
        )
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        return ClassSubset(path.stem, tuple(int(line) for line in lines))
    except ValueError as error:
        raise ValueError(f"subset={choice}: {error}") from None


def subset_classes(imagenet_indices: list[int], subset: ClassSubset) -> list[int]:
    """The task's own class ids that fall in ``subset``, in the subset's order (= new column order).

    ``imagenet_indices[c]`` is the ImageNet-1k index of the task's class ``c``.
    """
    position = {index: column for column, index in enumerate(subset.indices)}
    kept = [c for c, index in enumerate(imagenet_indices) if index in position]
    return sorted(kept, key=lambda c: position[imagenet_indices[c]])


def restrict_logits(logits: torch.Tensor, subset: ClassSubset) -> torch.Tensor:
    """[N, 1000] logits of a model with its own ImageNet head -> [N, len(subset)] in subset column order."""
    if logits.shape[1] != 1000:
        raise ValueError(f"subset logits need a 1000-way ImageNet head; got {logits.shape[1]} columns")
    return logits[:, list(subset.indices)]


def mask_logits(logits: torch.Tensor, subset: ClassSubset) -> torch.Tensor:
    """[N, 1000] logits with every class outside the subset at -inf (argmax stays in ImageNet indices)."""
    masked = torch.full_like(logits, float("-inf"))
    columns = list(subset.indices)
    masked[:, columns] = logits[:, columns]
    return masked
