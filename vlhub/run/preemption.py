"""Preemption that loses no work: on the scheduler's warning signal, finish the step, save, requeue.

SLURM warns a job before it is preempted or hits its time limit (``sbatch --signal=SIG@SECONDS``,
``scancel --signal=SIG``). A handler here only records the signal; the trainer folds "a signal
arrived" into the counters it already sums over ranks at the top of every step, so every rank
stops at the same step, even when only one rank was signalled. The checkpoint is then written
(by rank 0; under FSDP every rank also writes its shards) and the job is requeued; the requeued
job resumes from that step in the same run folder (``run.name``; the run lock is taken over when
it carries the same SLURM job id).

Which signals, and who requeues, is read from the environment (the library never sees the launcher):

- **under submitit** (Hydra's ``submitit_slurm`` launcher; ``SUBMITIT_EXECUTOR`` is set): submitit's
  preemption signal (``SUBMITIT_PREEMPT_SIGNAL``, ``USR2`` by default). submitit has installed its
  own handler for it, which requeues the job; it is remembered and called once the checkpoint is
  written, never replaced silently. SIGTERM stays with submitit (it ignores it on purpose).
- **otherwise** (plain ``sbatch``/``srun``, torchrun, one process): ``SIGUSR1`` and ``SIGTERM``. After
  the checkpoint, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` when the job is requeueable, any
  previous Python handler is called, and every rank exits with status 128 + the signal number.

A handler interrupts nothing but a wait for data (``Preemption.interruptible``: a source may stall
for ever), so a signal during a checkpoint write changes nothing until the write is done (the
writes are atomic besides: a temporary file renamed over the old one). A second signal once a stop
is requested means "now": the previous handler gets it (for SIGTERM, the default action ends the
process), but only after a checkpoint write in progress has finished.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

from vlhub.parallel.collectives import barrier

log = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any] | int | None


class WaitInterrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt: no broad ``except Exception`` takes it)
    """A stop signal arrived while the trainer waited for data (:meth:`Preemption.interruptible`)."""


def submitit_signal() -> signal.Signals:
    """The signal submitit requeues on (``SUBMITIT_PREEMPT_SIGNAL``, e.g. ``USR2``; submitit's own default)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    found = getattr(signal, f"SIG{name}", None)
    if found is None:
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name}: no such signal (expected e.g. USR2)")
    return found


def job_is_requeueable(job_id: str) -> bool:
    """Whether SLURM will requeue ``job_id`` (``sbatch --requeue`` or the cluster's ``JobRequeue=1``)."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("cannot ask SLURM whether job %s is requeueable: %s", job_id, error)
        return False
    return "Requeue=1" in shown.split()


class Preemption:
    """Records ``signals``; :meth:`finish` acts on them once the trainer has stopped and saved.

    ``requeue`` is ``"submitit"`` (chain to submitit's handler, which requeues), ``"scontrol"``
    (requeue this SLURM job ourselves when it is requeueable) or ``"none"`` (save and exit).
    ``Preemption()`` with no signals is inert: never requested, installs nothing.
    """

    def __init__(self, signals: Sequence[int] = (), requeue: str = "none", rank: int = 0) -> None:
        if requeue not in ("submitit", "scontrol", "none"):
            raise ValueError(f"requeue must be submitit, scontrol or none, got {requeue!r}")
        self.signals, self.requeue, self.rank = [signal.Signals(s) for s in signals], requeue, rank
        self.previous: dict[signal.Signals, Handler] = {}
        self.signum: int | None = None  # the first signal received
        self.stopped_at: int | None = None  # the step the trainer stopped at, once it has
        self._writing, self._pending_now, self._installed = 0, None, False
        self._waiting = 0

    @classmethod
    def from_environment(cls, rank: int = 0) -> Preemption:
        """submitit's signal under submitit, else SIGUSR1 and SIGTERM (requeued by scontrol in a SLURM job)."""
        if os.environ.get("SUBMITIT_EXECUTOR"):
            return cls([submitit_signal()], "submitit", rank)
        return cls([signal.SIGUSR1, signal.SIGTERM], "scontrol" if "SLURM_JOB_ID" in os.environ else "none", rank)

    # -- signals --------------------------------------------------------------------------------
    def install(self) -> Preemption:
        """Our handler for each signal; the one it replaces is remembered and called in :meth:`finish`."""
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._handle)
        self._installed = True
        return self

    def uninstall(self) -> None:
        """The previous handlers back (a handler installed from C, unknown to Python, becomes the default)."""
        if self._installed:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            self._installed = False

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning(
                "received %s: stopping after this step to save a checkpoint (a second signal stops at once)",
                signal.Signals(signum).name,
            )
            if self._waiting:
                raise WaitInterrupted(signal.Signals(signum).name)
        elif self._writing:
            self._pending_now = signum  # acted on once the checkpoint is written
        else:
            self._stop_now(signum)

    def _stop_now(self, signum: int) -> None:
        log.warning("received %s again: handing it to the previous handler now", signal.Signals(signum).name)
        self.uninstall()
        signal.raise_signal(signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A wait for data, which may never end (a stalled file system, a source that yields nothing): a stop
        signal ends it at once with :class:`WaitInterrupted` (the batch never came, so nothing is lost)."""
        if self.requested:
            raise WaitInterrupted(signal.Signals(self.signum).name)  # type: ignore[arg-type]
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A checkpoint write: a second signal waits until it is done."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
            if not self._writing and self._pending_now is not None:
                self._stop_now(self._pending_now)

    # -- after the trainer stopped ------------------------------------------------------------------
    def note_stop(self, step: int) -> None:
        self.stopped_at = step

    def finish(self) -> None:
        """Once the trainer stopped on a signal and saved: requeue (or let submitit) and exit.

        Nothing when no signal stopped the trainer (a signal during the final save or evaluation
        of a finished run is moot: the run is done)."""
        self.uninstall()
        if self.stopped_at is None or self.signum is None:
            return
        signum, name = self.signum, signal.Signals(self.signum).name
        previous = self.previous.get(signal.Signals(signum))
        if self.requeue == "submitit":
            # submitit's handler: on rank 0 it requeues and exits; on the others it logs and returns,
            # and the task ends normally (a failing task could take rank 0 down before it requeues).
            log.warning("stopped at step %d on %s: handing over to submitit to requeue", self.stopped_at, name)
            if callable(previous):
                previous(signum, None)
            return
        if self.requeue == "scontrol" and self.rank == 0:
            self._requeue_slurm_job(name)
        elif self.rank == 0:
            log.warning("stopped at step %d on %s; relaunch with the same run.name to resume", self.stopped_at, name)
        barrier()  # no rank exits (a failed task can end the step) before rank 0 has requeued
        if callable(previous):
            previous(signum, None)
        raise SystemExit(128 + signum)

    def _requeue_slurm_job(self, name: str) -> None:
        job = os.environ["SLURM_JOB_ID"]
        if job_is_requeueable(job):
            log.warning("stopped at step %d on %s: requeueing SLURM job %s", self.stopped_at, name, job)
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        else:
            log.warning(
                "stopped at step %d on %s; SLURM job %s is not requeueable (sbatch --requeue): "
                "resubmit it with the same run.name to resume",
                self.stopped_at,
                name,
                job,
            )
