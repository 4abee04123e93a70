"""The trainer's counters, in one object that a checkpoint stores and a resume restores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainerState:
    """Counted over the run, not per launch (a resume continues them).

    ``samples_consumed`` is the data stream's position (all ranks); ``wall_seconds`` the training
    time summed over launches (the loop's steps, data included; evaluation and checkpoints not);
    ``flops_per_sample`` one step's FLOPs per sample, counted on this launch's first step;
    ``data_layout`` what a shard stream's order depends on (checked at resume).
    """

    step: int = 0
    epoch: int = 0
    samples_consumed: int = 0
    samples_read: int = 0
    bad_samples: int = 0
    filtered_samples: int = 0  # captions naming no class (streams; map-style filters at start)
    nonfinite_steps: int = 0
    wall_seconds: float = 0.0
    flops_per_sample: float | None = None
    data_layout: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's keys (``step``, ``epoch`` and its ``data`` dict, as every earlier vlhub wrote them)."""
        data = {
            "samples_read": self.samples_read,
            "bad_samples": self.bad_samples,
            "filtered_samples": self.filtered_samples,
            "nonfinite_steps": self.nonfinite_steps,
            "samples_consumed": self.samples_consumed,
            "wall_seconds": self.wall_seconds,
            "layout": self.data_layout,
        }
        return {"step": self.step, "epoch": self.epoch, "data": data}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """From a checkpoint; keys added after a checkpoint was written start at zero.
        ``flops_per_sample`` is not stored: it is counted again on the first step."""
        data = checkpoint["data"]
        self.step, self.epoch = int(checkpoint["step"]), int(checkpoint["epoch"])
        self.samples_read, self.bad_samples = int(data["samples_read"]), int(data["bad_samples"])
        self.samples_consumed = int(data["samples_consumed"])
        self.filtered_samples = int(data.get("filtered_samples", 0))
        self.nonfinite_steps = int(data.get("nonfinite_steps", 0))
        self.wall_seconds = float(data.get("wall_seconds", 0.0))
        self.data_layout = data.get("layout")

    def record(self) -> dict[str, Any]:
        """The counters every results.jsonl record carries (after its step, epoch and run info)."""
        return {
            "data/bad_samples": self.bad_samples,
            "data/samples_read": self.samples_read,
            "data/filtered_samples": self.filtered_samples,
            "train/nonfinite_steps": self.nonfinite_steps,
            "train/samples_seen": self.samples_consumed,  # all ranks, from the run's start
            "train/wall_seconds": self.wall_seconds,
            "train/flops_per_sample": self.flops_per_sample,
        }
