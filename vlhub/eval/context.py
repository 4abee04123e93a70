"""What a task is run with: built fresh by the evaluator for each task and each run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlhub.eval.prompts import ClassNameTransform
from vlhub.eval.scoring import Scoring
from vlhub.eval.subsets import ClassSubset


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
    scoring: Scoring | None = None  # how the objective scores images; None: CLIP's (default_scoring)
