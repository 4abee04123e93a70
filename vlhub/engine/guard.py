"""What the loop does with each batch and each loss: train, skip, or stop.

Bad samples, empty batches, filtered captions and non-finite losses are counted here, into the run's
:class:`~vlhub.engine.state.TrainerState`. A limit passed raises, naming its key; a stop signal on any
rank stops every rank (with a checkpoint). ``bad / read`` is held to ``max_bad_fraction`` once
``bad_fraction_min_samples`` were read; before, the run stops as soon as the bad ones alone exceed that
fraction of ``bad_fraction_min_samples`` (an all-bad source stops within a few batches, a few bad
samples in the first batch do not). ``max_empty_batches`` bounds the batches in a row without a good
sample (with ``max_bad_fraction=1.0`` nothing else would stop an all-bad source).
"""

from __future__ import annotations

import enum
import logging

from vlhub.data.batch import LoadedBatch, batch_size_of
from vlhub.engine.state import TrainerState
from vlhub.parallel.collectives import all_reduce_sum

log = logging.getLogger(__name__)


class Verdict(enum.Enum):
    TRAIN = "train"
    SKIP = "skip"  # nothing is updated; the data stream moves on
    STOP = "stop"  # a rank was signalled (preemption, time limit): every rank saves and stops


class StepGuard:
    def __init__(
        self,
        max_bad_fraction: float = 0.1,
        bad_fraction_min_samples: int = 500,
        max_empty_batches: int = 20,
        max_nonfinite_steps: int = 5,
    ) -> None:
        self.max_bad_fraction, self.bad_fraction_min_samples = max_bad_fraction, bad_fraction_min_samples
        self.max_empty_batches, self.max_nonfinite_steps = max_empty_batches, max_nonfinite_steps
        self.empty_in_a_row = self.nonfinite_in_a_row = 0  # not checkpointed: a resume starts them afresh

    def admit(self, state: TrainerState, loaded: LoadedBatch | None, min_samples: int, stop: bool) -> Verdict:
        """A batch (None: the wait for it was interrupted), counted over all ranks, so every rank sees
        the same totals and decides alike. ``min_samples``: fewer good ones on a rank and all skip."""
        counts = [0, 0, 0, 0]
        if loaded is not None:
            unusable = not loaded.batch or batch_size_of(loaded.batch) < min_samples
            counts = [loaded.samples_read, loaded.bad_samples, int(unusable), loaded.filtered]
        read, bad, empty, filtered, stops = all_reduce_sum([*counts, int(stop)])
        if stops or loaded is None:
            return Verdict.STOP
        state.filtered_samples += filtered
        self.count_samples(state, read, bad, loaded.bad_reasons)
        self.empty_in_a_row = self.empty_in_a_row + 1 if empty else 0
        if self.empty_in_a_row > self.max_empty_batches:
            raise RuntimeError(
                f"{self.empty_in_a_row} batches in a row held no good sample ({state.bad_samples} bad of "
                f"{state.samples_read} read), more than data.max_empty_batches={self.max_empty_batches}: "
                "check data.root"
            )
        if empty:
            log.warning("skipped a step: a rank's whole batch was bad (%d bad so far)", state.bad_samples)
            return Verdict.SKIP
        return Verdict.TRAIN

    def count_samples(self, state: TrainerState, read: int, bad: int, reasons: list[str]) -> None:
        state.samples_read += read
        state.bad_samples += bad
        for reason in reasons[:3]:
            log.warning("skipped a bad sample: %s", reason)
        read, bad, floor = state.samples_read, state.bad_samples, self.bad_fraction_min_samples
        if read and bad / max(read, floor) > self.max_bad_fraction:
            early = f" of the first data.bad_fraction_min_samples={floor}" if read < floor else ""
            raise RuntimeError(
                f"{bad} of {read} samples read were bad ({bad / read:.1%}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction}{early}; last: {reasons[-1] if reasons else 'n/a'}"
            )

    def after_loss(self, state: TrainerState, finite: bool) -> Verdict:
        """A non-finite loss (on some rank) updated nothing: skip it, and stop after a few in a row."""
        if finite:
            self.nonfinite_in_a_row = 0
            return Verdict.TRAIN
        state.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning(
            "skipped a step at step %d: the loss is not finite (%d such steps so far)",
            state.step,
            state.nonfinite_steps,
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"the loss was not finite in {self.nonfinite_in_a_row} steps in a row after step {state.step} "
                f"(trainer.max_nonfinite_steps={self.max_nonfinite_steps}); no weights were updated by them "
                "nor saved: lower optim.lr, raise optim.warmup_steps, set trainer.grad_clip_norm or use fp32"
            )
        return Verdict.SKIP
