"""Evaluation tasks. Each checks its data when built (before training) and runs on demand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlhub.data.files import ImageFolderPairs
from vlhub.data.sources import PairSource
from vlhub.data.synthetic import SyntheticShapes
from vlhub.eval.zeroshot import zero_shot_metrics
from vlhub.registry import EVAL_TASKS

SIMPLE_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class EvalContext:
    """What a task is run with. ``name`` is the task's key (``eval.<name>``) and metric prefix."""

    name: str
    transform: object
    device: torch.device
    batch_size: int = 256
    workers: int = 0
    output_dir: Path | None = None  # <run dir>/eval/<name>, for tables and plots


def read_templates(templates: list[str] | str | None, default: tuple[str, ...]) -> list[str]:
    """A list as given, a file of one template per line, or the task's default."""
    if templates is None:
        return list(default)
    if isinstance(templates, str):
        path = Path(templates)
        if not path.is_file():
            raise FileNotFoundError(f"templates file {templates} does not exist")
        templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"every template needs a '{{}}' for the class name; got {bad or 'none'}")
    return list(templates)


class ZeroShotTask:
    """Zero-shot classification of a labelled source against its class names."""

    def __init__(self, name: str, source: PairSource, class_names: list[str], templates: list[str]) -> None:
        self.name, self.source, self.class_names, self.templates = name, source, class_names, templates

    def run(self, model, context: EvalContext) -> dict[str, float]:
        """Metrics keyed ``<context.name>-zeroshot-*``."""
        return zero_shot_metrics(model, context.name, self.source, self.class_names, self.templates,
                                 context.transform, context.device, context.batch_size, context.workers)


@EVAL_TASKS.register("synthetic")
class SyntheticZeroShot(ZeroShotTask):
    """The held-out split of the generated shapes: (colour, shape) classes, class-balanced."""

    def __init__(self, num_samples: int = 1200, seed: int = 0, image_size: int = 64,
                 templates: list[str] | str | None = None) -> None:
        source = SyntheticShapes(num_samples=num_samples, seed=seed, split="val", image_size=image_size)
        super().__init__("synthetic", source, source.class_names, read_templates(templates, tuple(source.templates)))


@EVAL_TASKS.register("imagefolder")
class ImageFolderZeroShot(ZeroShotTask):
    """Any ``root/<class>/<image>`` folder; class names from a file (one per line) or folder names."""

    def __init__(self, root: str | None, class_names_file: str | None = None,
                 templates: list[str] | str | None = None, name: str = "imagefolder") -> None:
        if root is None:
            raise ValueError(f"eval.{name}.root is not set: give the folder of class sub-folders")
        source = ImageFolderPairs(root, class_names_file=class_names_file)
        super().__init__(name, source, source.class_names, read_templates(templates, SIMPLE_TEMPLATES))
