"""The evaluator: a set of tasks, what they share, when to run them, and one flat metrics dict."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from vlhub.eval.context import EvalContext
from vlhub.eval.labelled_files import RootNotSet
from vlhub.eval.prompts import TEMPLATE_SETS, ClassNameTransform, read_template_file
from vlhub.eval.scoring import Scoring
from vlhub.eval.subsets import load_subset
from vlhub.eval.tasks import ZeroShotTask
from vlhub.parallel.environment import loader_workers, rank

log = logging.getLogger(__name__)


class Evaluator:
    """Runs every task (in name order) every ``every_n_steps`` steps and at the end of training.

    A task's name is its key (``eval.<name>``), and its metrics are keyed ``<name>-...``.
    ``workers`` decode images in DataLoader workers; ``auto`` sizes them to the machine.
    ``templates``, ``subset``, ``classnames`` and ``extended_metrics`` are shared by every task
    and handed to each through a fresh :class:`EvalContext`.

    A task may also be given as a zero-argument builder (Hydra's ``_partial_: true``), which the
    evaluator calls here, still before training. With ``skip_tasks_without_root`` (the ``suite``
    preset), a builder whose ``root`` is unset (:class:`RootNotSet`) is left out instead of
    failing; any other error (a wrong folder) still fails.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        batch_size: int = 256,
        workers: int | str = "auto",
        templates: str = "openai",
        subset: str | None = None,
        extended_metrics: bool = False,
        classnames: ClassNameTransform | None = None,
        skip_tasks_without_root: bool = False,
        **tasks: ZeroShotTask | Callable[[], ZeroShotTask],
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if workers == "auto":  # as many as this machine gives each rank (vlhub.parallel.environment.loader_workers)
            workers = loader_workers()
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0 or 'auto', got {workers!r}")
        if templates not in TEMPLATE_SETS:
            read_template_file(templates)  # fail now, not at the first evaluation
        self.every_n_steps, self.batch_size, self.workers = every_n_steps, batch_size, workers
        self.templates, self.extended_metrics = templates, extended_metrics
        self.subset = load_subset(subset)
        self.classnames = classnames if classnames is not None else ClassNameTransform()
        scope = f" on the {subset} subset" if subset else ""
        self.tasks = dict(sorted(_build_tasks(tasks, skip_tasks_without_root, scope).items()))

    def add_task(self, name: str, task) -> None:
        """Evaluate ``task`` too, as ``eval.<name>`` (e.g. the data group's validation pairs)."""
        if name in self.tasks:
            raise KeyError(f"eval task {name!r} is already configured")
        self.tasks = dict(sorted({**self.tasks, name: task}.items()))

    def due(self, step: int) -> bool:
        return bool(self.tasks) and self.every_n_steps > 0 and step % self.every_n_steps == 0

    def context(
        self,
        name: str,
        transform,
        device: torch.device,
        output_dir: Path | None = None,
        scoring: Scoring | None = None,
    ) -> EvalContext:
        """The context task ``name`` runs with; a new one per task and per run."""
        return EvalContext(
            name,
            transform,
            device,
            self.batch_size,
            self.workers,
            output_dir / name if output_dir is not None else None,
            templates=self.templates,
            subset=self.subset,
            class_names=self.classnames,
            extended_metrics=self.extended_metrics,
            scoring=scoring,
        )

    @torch.no_grad()
    def run(
        self,
        model,
        transform,
        device: torch.device,
        output_dir: Path | None = None,
        scoring: Scoring | None = None,
    ) -> dict[str, float]:
        """Every task's metrics; ``scoring`` is how the objective scores images (None: CLIP's).

        Under a process group every rank must call this: each encodes its share of every
        dataset and all return the same metrics, equal to one process's
        (:mod:`vlhub.eval.sharding`); rank 0 alone writes tables and logs.
        """
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        try:
            for name, task in self.tasks.items():
                task_metrics = task.run(model, self.context(name, transform, device, output_dir, scoring))
                if rank() == 0:
                    log.info("eval %s: %s", name, {k: round(v, 4) for k, v in task_metrics.items()})
                metrics.update(task_metrics)
        finally:
            model.train(was_training)
        return metrics


def _build_tasks(tasks: dict, skip_tasks_without_root: bool, scope: str = "") -> dict[str, ZeroShotTask]:
    built: dict[str, ZeroShotTask] = {}
    for name, task in tasks.items():
        if hasattr(task, "run"):
            built[name] = task
            continue
        if not callable(task):
            raise TypeError(f"{name}={task!r}: neither a task nor a task builder")
        try:
            built[name] = task()
        except RootNotSet:
            if not skip_tasks_without_root:
                raise
            log.info("eval %s%s: left out; add it with eval.%s.root=<dataset folder>", name, scope, name)
    return built
