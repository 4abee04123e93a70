"""The run session: one object owns a launch's lifecycle in its run folder.

``vlhub.train.train`` opens it once, and the trainer saves through it::

    with RunSession(run_dir) as run:                # on a failure: cleanup, uploads stopped, lock released
        ...                                         # config checks, process group
        run.open(CheckpointSettings(**cfg.checkpoint), config, dist_info, defaults)
        trainer = ...                               # saves and resumes through ``run``
        run.track(lambda: trainer.state.step)
        metrics = trainer.fit(run)
        run.finish()                                # the final logs uploaded; the last checkpoint must be there

Opening: the ``checkpoint.*`` values are checked; on rank 0, ``checkpoint.remote`` is probed, the
folder is locked (``run/lock.py``), an empty folder is restored from the remote
(``run/remote_restore.py``), the start is decided (``run/resume.py``) and recorded (``run.json``,
``config.yaml``); then every rank gets the decision and reads the checkpoint to continue from, and
rank 0 starts the background uploader (``run/remote_uploader.py``). The trainer's side, on every
rank: ``due``, ``save`` (the checkpoint file, then its upload queued), ``save_sharded``,
``load_for_resume``, ``resume_from`` and ``before_write`` (the lock's check, which refuses writes
once another launch took the folder over). Closing after a failure removes the folder Hydra made
for this launch when nothing trained (``run/folder.py``).

Preemption: the trainer stops on a signal and saves through the session as usual; the requeue
(``Preemption.finish``) runs after the session closed, so the requeued job finds the uploads done
and the lock released.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from vlhub.parallel.collectives import broadcast_object
from vlhub.parallel.environment import DistInfo, get_dist_info
from vlhub.run.checkpoint import Checkpointer, read_checkpoint_file
from vlhub.run.folder import holds_only_launch_files, remove_failed_launch
from vlhub.run.identity import launch_environment
from vlhub.run.lock import LOCK, STALE_AFTER_S, RunFolderError, RunLock
from vlhub.run.remote_restore import restore_or_refuse
from vlhub.run.remote_store import RemoteStore, open_store
from vlhub.run.remote_uploader import RemoteUploader, check_upload_settings
from vlhub.run.resume import RunStart, decide_start, record_start
from vlhub.run.secrets import scrub_hydra_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointSettings:
    """The ``checkpoint.*`` keys (``configs/train.yaml`` says what each means): the checkpoint files,
    the resume decision, the remote copy and the run folder's lock."""

    every_n_steps: int
    keep: int
    resume: str | None
    move_aside: bool
    allow_config_change: bool
    remote: str | None
    remote_options: dict[str, Any] | None
    remote_retries: int
    remote_backoff_s: float
    lock_stale_after_s: float


class RunSession:
    """A launch's run folder from lock to final upload (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.main = get_dist_info("cpu").is_main  # the launcher's rank, known before any process group
        # Only what Hydra wrote: this launch made the folder, and removes it if it fails before training.
        self.made_here = holds_only_launch_files(run_dir)
        self.settings: CheckpointSettings | None = None
        self.start: RunStart | None = None
        self.checkpointer: Checkpointer | None = None
        self.lock: RunLock | None = None
        self.uploader: RemoteUploader | None = None
        self.resume_from = "checkpoint.resume"  # ``KEY=PATH`` of the checkpoint resumed from, for the messages
        self._resume_checkpoint: dict[str, Any] | None = None
        self._step: Callable[[], int] = lambda: 0

    def __enter__(self) -> RunSession:
        if self.main:
            scrub_hydra_files(self.run_dir)  # Hydra wrote the overrides before vlhub ran: no credentials there
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if error is not None and self.main and not self.trained:
                stale_after_s = self.settings.lock_stale_after_s if self.settings else STALE_AFTER_S
                remove_failed_launch(self.run_dir, self.made_here, self.lock, stale_after_s)
        finally:
            if self.uploader is not None:
                self.uploader.abandon()
            if self.lock is not None:
                self.lock.release()

    # -- opening --------------------------------------------------------------------------------------
    def open(
        self,
        settings: CheckpointSettings,
        config: dict[str, Any],
        dist_info: DistInfo,
        defaults: dict[str, Any] | None = None,
    ) -> RunStart:
        """Lock the folder and decide the start on rank 0; every rank gets the decision and the
        checkpoint to continue from (read before any model is built). ``config`` is the run's
        config as stored (secrets masked); ``defaults``: keys a later vlhub added, at their defaults (no
        change when a resumed checkpoint's config lacks them)."""
        self.settings, self.defaults = settings, defaults
        self.run_dir = broadcast_object(self.run_dir)  # every rank writes under rank 0's run folder
        folder = Checkpointer(self.run_dir / "checkpoints", settings.every_n_steps, settings.keep, settings.resume)
        start, store, error = None, None, None
        if dist_info.is_main:
            try:
                start, store = self._decide(folder, settings, config, dist_info)
            except Exception as caught:  # every rank hears of it first, so none waits for ever
                error = caught
        decided = None if start is None else (start.run_id, start.checkpoint_path, start.step, start.finished)
        shared = broadcast_object(decided)
        if error is not None:
            raise error
        if shared is None:
            raise RunFolderError(f"rank 0 could not open the run folder {self.run_dir} (see its log)")
        self.start = start if start is not None else RunStart(*shared)
        self.checkpointer = folder.for_run(self.start.run_id, self.before_write)
        if self.start.finished:
            return self.start
        if store is not None:
            retries, backoff_s = settings.remote_retries, settings.remote_backoff_s
            self.uploader = RemoteUploader(store, self.run_dir, self.start.run_id, settings.keep, retries, backoff_s)
        if self.start.checkpoint_path is not None:
            key = "checkpoint.resume" if settings.resume not in (None, "auto") else "checkpoint"
            self._resume_checkpoint = read_checkpoint_file(self.start.checkpoint_path, key)
            self.resume_from = f"{key}={self.start.checkpoint_path}"
        return self.start

    def _decide(
        self, folder: Checkpointer, settings: CheckpointSettings, config: dict[str, Any], dist_info: DistInfo
    ) -> tuple[RunStart, RemoteStore | None]:
        """Rank 0: probe the remote, lock the folder, restore it from the remote when empty, decide, record."""
        store = None
        if settings.remote:
            check_upload_settings(settings.remote_retries, settings.remote_backoff_s)
            store = open_store(settings.remote, settings.remote_options)
        self.lock = RunLock.acquire(self.run_dir / LOCK, settings.lock_stale_after_s)
        if store is not None:
            restore_or_refuse(store, self.run_dir, folder.folder, settings.resume)
        folder.check_writable()
        start = decide_start(
            self.run_dir,
            folder.folder,
            settings.resume,
            config,
            settings.move_aside,
            settings.allow_config_change,
            self.defaults,
        )
        if not start.finished:
            record_start(self.run_dir, start, config, launch_environment(dist_info))
        return start, store

    # -- what the trainer calls -----------------------------------------------------------------------
    @property
    def before_write(self) -> Callable[[], None] | None:
        """Raises once another launch took the run folder's lock over (rank 0; None elsewhere)."""
        return self.lock.check if self.lock is not None else None

    def due(self, step: int) -> bool:
        return self._opened().due(step)

    def save(self, payload: dict[str, Any]) -> Path:
        """Rank 0: the checkpoint file (rotating the run's old ones), then its upload queued."""
        path = self._opened().save(payload)
        if self.uploader is not None:
            self.uploader.submit(int(payload["step"]), path)
        return path

    def save_sharded(
        self, step: int, root: nn.Module, optimizer: torch.optim.Optimizer, header: dict[str, Any] | None
    ) -> Path:
        """Collective: this step's sharded directory (``Checkpointer.save_sharded``), before :meth:`save`."""
        return self._opened().save_sharded(step, root, optimizer, header)

    def load_for_resume(self) -> dict[str, Any] | None:
        """The checkpoint chosen when the session opened, once (None for a fresh run)."""
        checkpoint, self._resume_checkpoint = self._resume_checkpoint, None
        return checkpoint

    # -- the end ----------------------------------------------------------------------------------------
    def track(self, step: Callable[[], int]) -> None:
        """Where the trainer is (``step()``): the final upload's step, and on a failure whether anything trained."""
        self._step = step

    @property
    def trained(self) -> bool:
        """This run has trained steps: resumed past step 0, or the trainer stepped."""
        return (self.start is not None and self.start.step > 0) or self._step() > 0

    def finish(self) -> None:
        """Rank 0: the final logs uploaded and every queued upload waited for; an error when the last
        checkpoint never reached ``checkpoint.remote``."""
        if self.uploader is not None:
            self.uploader.finish(self._step())

    def _opened(self) -> Checkpointer:
        if self.checkpointer is None:
            raise RuntimeError("the run session is not open: call open() before saving or loading through it")
        return self.checkpointer
