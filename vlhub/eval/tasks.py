"""Evaluation tasks. Each checks its data when built (before training) and runs on demand.

A task holds only its data: images, class names, its published templates and, for ImageNet and
its shifts, each class's ImageNet-1k index. What is shared by every task of a run (template
set, subset, class-name transform, extended metrics) arrives in the :class:`EvalContext`, which
is built fresh for each task, so nothing carries over from one dataset to the next.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vlhub.data.files import ImageFolderPairs
from vlhub.data.sources import PairSource
from vlhub.data.synthetic import SyntheticShapes
from vlhub.eval.metrics import classification_metrics
from vlhub.eval.prompts import ClassNameTransform, check_templates, read_template_file, resolve_templates
from vlhub.eval.reports import write_classification_report
from vlhub.eval.sources import LabelledFiles, RootNotSet
from vlhub.eval.subsets import ClassSubset, subset_classes
from vlhub.eval.zeroshot import build_zero_shot_classifier, compute_image_logits
from vlhub.registry import EVAL_TASKS

log = logging.getLogger(__name__)

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
    templates: str = "openai"  # eval.templates: openai | simple | FILE
    subset: ClassSubset | None = None  # eval.subset, resolved
    class_names: ClassNameTransform = ClassNameTransform()  # eval.classnames
    extended_metrics: bool = False


def task_templates(templates: list[str] | str | None, key: str = "templates") -> list[str] | None:
    """A task's own ``templates`` (a list, or a file of one per line), which wins over ``eval.templates``."""
    if templates is None:
        return None
    if isinstance(templates, str):
        return read_template_file(templates, key)
    return check_templates(list(templates), key)


@dataclass(frozen=True)
class TaskView:
    """A task as one run sees it: the (possibly subset) source, its class names, its metric prefix."""

    source: PairSource
    class_names: list[str]
    prefix: str  # <task>[-<subset>]


class ZeroShotTask:
    """Zero-shot classification of a labelled source against its class names.

    ``templates`` is the dataset's own (published) set, used for ``eval.templates=openai``;
    ``override`` is the task's ``templates`` key, used whatever ``eval.templates`` says.
    ``imagenet_indices[c]`` is class ``c``'s ImageNet-1k index when it has one, so
    ``eval.subset`` applies; tasks without it are evaluated whole.
    """

    def __init__(
        self,
        name: str,
        source: PairSource,
        class_names: list[str],
        templates: list[str],
        imagenet_indices: list[int] | None = None,
        override: list[str] | None = None,
    ) -> None:
        if imagenet_indices is not None and len(imagenet_indices) != len(class_names):
            raise ValueError(f"{name}: {len(imagenet_indices)} ImageNet indices for {len(class_names)} classes")
        self.name, self.source, self.class_names, self.templates = name, source, class_names, templates
        self.imagenet_indices, self.override = imagenet_indices, override

    def view(self, context: EvalContext) -> TaskView:
        subset = context.subset
        if subset is None or self.imagenet_indices is None:
            return TaskView(self.source, self.class_names, context.name)
        if not isinstance(self.source, LabelledFiles):
            raise TypeError(f"{self.name}: a subset needs a LabelledFiles source, got {type(self.source).__name__}")
        kept = subset_classes(self.imagenet_indices, subset)
        if not kept:
            raise ValueError(f"eval.subset={subset.name} shares no class with {context.name}")
        return TaskView(
            self.source.restrict(kept), [self.class_names[c] for c in kept], f"{context.name}-{subset.name}"
        )

    def run(self, model, context: EvalContext) -> dict[str, float]:
        """Metrics keyed ``<context.name>[-<subset>]-zeroshot-*``; tables and plots when asked."""
        view = self.view(context)
        if len(view.source) == 0:
            raise ValueError(f"{view.prefix}: no images to evaluate")
        templates = self.override or resolve_templates(context.templates, self.templates)
        names = context.class_names.apply(view.class_names)
        classifier = build_zero_shot_classifier(model, names, templates, context.device, context.batch_size)
        logits, targets, skipped = compute_image_logits(
            model, classifier, view.source, context.transform, context.device, context.batch_size, context.workers
        )
        metrics = classification_metrics(logits, targets, f"{view.prefix}-zeroshot")
        if skipped:
            metrics[f"{view.prefix}-skipped_samples"] = float(skipped)
        if context.extended_metrics:
            if context.output_dir is None:
                log.warning("eval %s: extended metrics need an output folder; none given", view.prefix)
            else:
                write_classification_report(context.output_dir, logits, targets, view.class_names, view.prefix)
        return metrics


@EVAL_TASKS.register("synthetic")
class SyntheticZeroShot(ZeroShotTask):
    """The held-out split of the generated shapes: (colour, shape) classes, class-balanced."""

    def __init__(
        self, num_samples: int = 1200, seed: int = 0, image_size: int = 32, templates: list[str] | str | None = None
    ) -> None:
        source = SyntheticShapes(num_samples=num_samples, seed=seed, split="val", image_size=image_size)
        super().__init__(
            "synthetic",
            source,
            source.class_names,
            list(source.templates),
            override=task_templates(templates, "eval.synthetic.templates"),
        )


@EVAL_TASKS.register("imagefolder")
class ImageFolderZeroShot(ZeroShotTask):
    """Any ``root/<class>/<image>`` folder; class names from a file (one per line) or folder names."""

    def __init__(
        self,
        root: str | None,
        class_names_file: str | None = None,
        templates: list[str] | str | None = None,
        name: str = "imagefolder",
    ) -> None:
        if root is None:
            raise RootNotSet(f"eval.{name}.root is not set: give the folder of class sub-folders")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"eval.{name}.root={root}: no such folder (expected one folder per class)")
        source = ImageFolderPairs(root, class_names_file=class_names_file)
        super().__init__(
            name,
            source,
            source.class_names,
            list(SIMPLE_TEMPLATES),
            override=task_templates(templates, f"eval.{name}.templates"),
        )
