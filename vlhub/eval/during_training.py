"""The evaluation a training run does every ``every_n_steps`` steps and at its end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlhub.eval.evaluator import Evaluator


@dataclass
class Evaluation:
    """The tasks (``vlhub.eval.Evaluator``), the eval image transform, the folder for their outputs."""

    evaluator: Evaluator
    transform: Callable[[Any], torch.Tensor]
    folder: Path

    def due(self, step: int) -> bool:
        return self.evaluator.due(step)

    def run(
        self, model: nn.Module, objective: Any, parallel: Any, device: torch.device
    ) -> tuple[dict[str, float], dict[str, str]]:
        """The metrics, and ``{"scoring": ...}``: how the objective scored images (both empty without tasks).

        Every rank evaluates its share of each dataset; the metrics, gathered, are the same on every
        rank. A sharding strategy (``parallel``) hands every rank an unsharded copy of the model
        (sharded forwards are collectives)."""
        if not self.evaluator.tasks:
            return {}, {}
        with parallel.evaluation_model(model) as whole:
            scoring = objective.scoring(whole)  # the objective decides how images are scored
            metrics = self.evaluator.run(whole, self.transform, device, self.folder, scoring)
        return metrics, ({"scoring": scoring.record()} if metrics else {})
