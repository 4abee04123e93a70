"""The evaluator: a set of tasks, when to run them, and one flat metrics dict."""

from __future__ import annotations

import logging

import torch

from pathlib import Path

from vlhub.eval.tasks import EvalContext, ZeroShotTask

log = logging.getLogger(__name__)


class Evaluator:
    """Runs every task (in name order) every ``every_n_steps`` steps and at the end of training.

    A task's name is its key (``eval.<name>``), and its metrics are keyed ``<name>-...``.
    """

    def __init__(self, every_n_steps: int = 0, batch_size: int = 256, workers: int = 0,
                 **tasks: ZeroShotTask) -> None:
        if every_n_steps < 0:
            raise ValueError(f"eval.every_n_steps must be >= 0, got {every_n_steps}")
        if batch_size <= 0:
            raise ValueError(f"eval.batch_size must be > 0, got {batch_size}")
        self.every_n_steps, self.batch_size, self.workers = every_n_steps, batch_size, workers
        self.tasks = dict(sorted(tasks.items()))

    def due(self, step: int) -> bool:
        return bool(self.tasks) and self.every_n_steps > 0 and step % self.every_n_steps == 0

    @torch.no_grad()
    def run(self, model, transform, device: torch.device, output_dir: Path | None = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        try:
            for name, task in self.tasks.items():
                context = EvalContext(name, transform, device, self.batch_size, self.workers,
                                      output_dir / name if output_dir is not None else None)
                task_metrics = task.run(model, context)
                log.info("eval %s: %s", name, {k: round(v, 4) for k, v in task_metrics.items()})
                metrics.update(task_metrics)
        finally:
            model.train(was_training)
        return metrics
