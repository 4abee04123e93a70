"""Metric sinks: TensorBoard (default), wandb (when enabled), and ``results.jsonl``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wandb_run_id(run_dir: Path) -> str:
    """One wandb run per run folder, stable across requeues: the folder's path, made id-safe.

    Sweep jobs share ``run.name`` but not their folder (``runs/<name>/<job>``), so the folder,
    not the name, identifies the run.
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(run_dir.resolve())).strip("-")[-64:]


class MetricLogger:
    """Scalars to TensorBoard and wandb; evaluation records to ``results.jsonl``.

    Built on rank 0 only; the other ranks get none, so they log nothing.
    """

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        wandb_enabled: bool = False,
        wandb_project: str = "vlhub",
        wandb_mode: str = "online",
        run_name: str | None = None,
        config: dict | None = None,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir, self.before_write = run_dir, before_write  # raises once the run lost its folder
        run_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = run_dir / "results.jsonl"
        self._tensorboard = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb_enabled:
            if wandb_mode not in ("online", "offline", "disabled"):
                raise ValueError(f"logger.wandb.mode must be online, offline or disabled, got {wandb_mode!r}")
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                name=run_name or run_dir.name,
                mode=wandb_mode,
                dir=str(run_dir),
                config=config,
                resume="allow",
                id=wandb_run_id(run_dir),
            )

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_results(self, record: dict[str, Any]) -> None:
        """One flat JSON object per evaluation (SPEC section 6)."""
        if self.before_write is not None:
            self.before_write()
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.results_path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")

    def flush(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_metrics_table(metrics: dict[str, float], title: str = "metric") -> str:
    """A small two-column table of ``metrics``, names left, values right, for the console."""
    rows = [(name, f"{value:.4f}" if isinstance(value, float) else str(value)) for name, value in metrics.items()]
    name_width = max(len(title), *(len(name) for name, _ in rows)) if rows else len(title)
    value_width = max(len("value"), *(len(value) for _, value in rows)) if rows else len("value")
    lines = [f"{title:<{name_width}}  {'value':>{value_width}}", f"{'-' * name_width}  {'-' * value_width}"]
    lines += [f"{name:<{name_width}}  {value:>{value_width}}" for name, value in rows]
    return "\n".join(lines)
