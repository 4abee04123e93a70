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
from vlhub.data.pair_source import PairSource
from vlhub.data.synthetic import SyntheticShapes
from vlhub.eval.context import EvalContext
from vlhub.eval.labelled_files import LabelledFiles, RootNotSet
from vlhub.eval.linear_probe import probe_metrics
from vlhub.eval.metrics import classification_metrics
from vlhub.eval.prompts import check_templates, read_template_file, resolve_templates
from vlhub.eval.reports import write_classification_report
from vlhub.eval.scoring import Scoring, default_scoring
from vlhub.eval.subsets import subset_classes
from vlhub.eval.zeroshot import compute_image_logits
from vlhub.parallel.environment import rank
from vlhub.registry import EVAL_TASKS

log = logging.getLogger(__name__)

SIMPLE_TEMPLATES = ("a photo of a {}.",)


def task_templates(templates: list[str] | str | None, key: str = "templates") -> list[str] | None:
    """A task's own ``templates`` (a list, or a file of one per line), which wins over the evaluator's ``templates``."""
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

    ``templates`` is the dataset's own (published) set, used for the evaluator's ``templates="openai"``;
    ``override`` is the task's ``templates`` key, used whatever the evaluator's ``templates`` says.
    ``imagenet_indices[c]`` is class ``c``'s ImageNet-1k index when it has one, so
    the evaluator's ``subset`` applies; tasks without it are evaluated whole. ``probe_train`` is a labelled
    train split with the same classes, when the task has one: image-only objectives are scored
    by linear probe and k-NN on it (``Scoring.probe``).

    What is measured follows the objective's :class:`~vlhub.eval.scoring.Scoring`: zero-shot
    (``-zeroshot-*``), its own classifier's logits (``-classifier-*``), a probe
    (``-linear_probe-*``, ``-knn-*``); what it cannot score is skipped, never faked.
    """

    def __init__(
        self,
        name: str,
        source: PairSource,
        class_names: list[str],
        templates: list[str],
        imagenet_indices: list[int] | None = None,
        override: list[str] | None = None,
        probe_train: PairSource | None = None,
    ) -> None:
        if imagenet_indices is not None and len(imagenet_indices) != len(class_names):
            raise ValueError(f"{name}: {len(imagenet_indices)} ImageNet indices for {len(class_names)} classes")
        self.name, self.source, self.class_names, self.templates = name, source, class_names, templates
        self.imagenet_indices, self.override = imagenet_indices, override
        self.probe_train = probe_train

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
        """Metrics keyed ``<context.name>[-<subset>]-<how>-*``; tables and plots when asked."""
        view = self.view(context)
        if len(view.source) == 0:
            raise ValueError(f"{view.prefix}: no images to evaluate")
        scoring = context.scoring or default_scoring(model)
        metrics: dict[str, float] = {}
        if scoring.zero_shot is not None:
            metrics.update(self._zero_shot(scoring, view, context))
        elif rank() == 0:
            log.info("eval %s: zero-shot skipped: %s", view.prefix, scoring.absent)
        if scoring.classifier is not None:
            metrics.update(self._classifier(scoring, view, context))
        if scoring.probe:
            if self.probe_train is None:
                log.info("eval %s: no train split to probe image features on; skipped", view.prefix)
            else:
                metrics.update(probe_metrics(model, self.probe_train, view.source, context, view.prefix))
        return metrics

    def _zero_shot(self, scoring: Scoring, view: TaskView, context: EvalContext) -> dict[str, float]:
        templates = self.override or resolve_templates(context.templates, self.templates)
        names = context.class_names.apply(view.class_names)
        scorer = scoring.zero_shot
        classifier = scorer.build_classifier(names, templates, context.device, context.batch_size)
        logits, targets, skipped = compute_image_logits(
            lambda images: scorer.logits(images, classifier),
            view.source,
            context.transform,
            context.device,
            context.batch_size,
            context.workers,
        )
        return self._score(logits, targets, skipped, view, context, "zeroshot")

    def _classifier(self, scoring: Scoring, view: TaskView, context: EvalContext) -> dict[str, float]:
        """The objective's own classifier, on its columns for this task's classes (all must be known)."""
        known = {name: column for column, name in enumerate(scoring.classifier.class_names)}
        missing = [name for name in view.class_names if name not in known]
        if missing:
            log.info(
                "eval %s: the classifier was not trained on %d of its classes (e.g. %r); skipped",
                view.prefix,
                len(missing),
                missing[0],
            )
            return {}
        columns = torch.tensor([known[name] for name in view.class_names], device=context.device)  # once, not per batch
        logits, targets, skipped = compute_image_logits(
            lambda images: scoring.classifier.logits(images)[:, columns],
            view.source,
            context.transform,
            context.device,
            context.batch_size,
            context.workers,
        )
        return self._score(logits, targets, skipped, view, context, "classifier")

    def _score(
        self, logits: torch.Tensor, targets: torch.Tensor, skipped: int, view: TaskView, context: EvalContext, how: str
    ) -> dict[str, float]:
        metrics = classification_metrics(logits, targets, f"{view.prefix}-{how}")
        if skipped:
            metrics[f"{view.prefix}-skipped_samples"] = float(skipped)
        if context.extended_metrics and rank() == 0:  # every rank holds the gathered logits; rank 0 writes
            if context.output_dir is None:
                log.warning("eval %s: extended metrics need an output folder; none given", view.prefix)
            else:
                write_classification_report(context.output_dir, logits, targets, view.class_names, view.prefix)
        return metrics


@EVAL_TASKS.register("synthetic")
class SyntheticZeroShot(ZeroShotTask):
    """The held-out split of the generated shapes: (colour, shape) classes, class-balanced.

    Image-only objectives are probed with as many images of the train split."""

    def __init__(
        self, num_samples: int = 1200, seed: int = 0, image_size: int = 32, templates: list[str] | str | None = None
    ) -> None:
        source = SyntheticShapes(num_samples=num_samples, seed=seed, split="val", image_size=image_size)
        super().__init__(
            "synthetic",
            source,
            source.class_names,
            list(source.templates),
            override=task_templates(templates),
            # The train split's first images: what image-only objectives are probed on.
            probe_train=SyntheticShapes(num_samples=num_samples, seed=seed, split="train", image_size=image_size),
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
            raise RootNotSet("root=None: not set; give the folder of class sub-folders")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"root={root}: no such folder (expected one folder per class)")
        source = ImageFolderPairs(root, class_names_file=class_names_file)
        super().__init__(
            name,
            source,
            source.class_names,
            list(SIMPLE_TEMPLATES),
            override=task_templates(templates),
        )
