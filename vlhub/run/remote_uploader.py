"""The background uploader of ``checkpoint.remote``: rank 0 mirrors the run to the remote store.

After each checkpoint the run session snapshots the checkpoint (a hard link), ``results.jsonl``,
``run.json``, ``config.yaml`` and the TensorBoard files into ``<run dir>/.remote_upload/step_<N>/``
and queues them; a worker thread uploads each file (``RemoteStore.put``: a temporary name, a
rename, a size check), and only then rewrites the pointer ``latest.json``. So the remote latest
only ever names a complete file. A failed upload is retried with exponential backoff
(``checkpoint.remote_retries``, ``checkpoint.remote_backoff_s``) and logged; when the final
checkpoint never reached the remote the run ends with an error. When uploads are slower than
checkpoints, a waiting snapshot is replaced by the newer one.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vlhub.run.remote_store import LOGS, RemoteError, RemoteStore

log = logging.getLogger(__name__)
STAGING = ".remote_upload"


def check_upload_settings(retries: int, backoff_s: float) -> None:
    if retries < 0 or backoff_s < 0:
        raise ValueError("checkpoint.remote_retries and checkpoint.remote_backoff_s must be >= 0")


@dataclass
class Snapshot:
    """The files of one checkpoint, frozen when it was saved: (local copy, remote relative path)."""

    step: int
    folder: Path
    checkpoint: str | None  # the relative path of the checkpoint, None for a logs-only sync
    files: list[tuple[Path, str]] = field(default_factory=list)


class RemoteUploader:
    """A worker thread that uploads snapshots in order, newest wins, retrying with backoff."""

    def __init__(
        self, store: RemoteStore, run_dir: Path, run_id: str, keep: int, retries: int = 5, backoff_s: float = 1.0
    ) -> None:
        """Uploads for run ``run_id`` of ``run_dir``; the remote keeps the newest ``keep`` checkpoints."""
        check_upload_settings(retries, backoff_s)
        self.store, self.run_dir, self.run_id, self.keep = store, run_dir, run_id, keep
        self.retries, self.backoff_s = retries, backoff_s
        self.staging = run_dir / STAGING
        shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run left
        self.queue: queue.Queue[Snapshot | None] = queue.Queue()
        self.failures: list[str] = []
        self.uploaded_step: int | None = None
        self.last_checkpoint_step: int | None = None
        self._thread = threading.Thread(target=self._work, name="vlhub-remote-upload", daemon=True)
        self._thread.start()

    # -- on the training thread ------------------------------------------------------------------------
    def submit(self, step: int, checkpoint: Path | None) -> None:
        """Snapshot the checkpoint (a hard link) and the logs as they are now, and queue them."""
        folder = self.staging / f"{'step' if checkpoint else 'logs'}_{step}_{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True)
        snapshot = Snapshot(step, folder, None)
        if checkpoint is not None:
            snapshot.checkpoint = f"{checkpoint.parent.name}/{checkpoint.name}"
            snapshot.files.append((_freeze(checkpoint, folder / checkpoint.name), snapshot.checkpoint))
            self.last_checkpoint_step = step
        sources = [self.run_dir / name for name in LOGS]
        if (self.run_dir / "tensorboard").is_dir():
            sources += sorted(p for p in (self.run_dir / "tensorboard").rglob("*") if p.is_file())
        for index, source in enumerate(p for p in sources if p.is_file()):
            frozen = _freeze(source, folder / f"{index}_{source.name}", copy=True)
            snapshot.files.append((frozen, source.relative_to(self.run_dir).as_posix()))
        self.queue.put(snapshot)

    def finish(self, step: int) -> None:
        """Upload the final logs, wait for every queued upload; an error when the last checkpoint
        never reached the remote."""
        self.submit(step, None)
        self.queue.put(None)
        self._thread.join()
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.last_checkpoint_step is not None and self.uploaded_step != self.last_checkpoint_step:
            raise RemoteError(
                f"checkpoint.remote={self.store.url}: the checkpoint of step {self.last_checkpoint_step} was not "
                f"uploaded ({'; '.join(self.failures[-3:]) or 'still uploading'}); the remote holds step "
                f"{self.uploaded_step}, the local run folder {self.run_dir} holds the rest"
            )
        if self.failures:
            log.error("checkpoint.remote=%s: %d uploads failed (see above)", self.store.url, len(self.failures))

    def abandon(self) -> None:
        """Stop the worker once the queue is done, without waiting (a failed or finished launch)."""
        if self._thread.is_alive():
            self.queue.put(None)

    # -- on the worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            waiting = [self.queue.get()]
            while waiting[-1] is not None and not self.queue.empty():
                waiting.append(self.queue.get())
            done = waiting[-1] is None
            for snapshot in _newest_only([s for s in waiting if s is not None]):
                try:
                    self._upload_with_retries(snapshot)
                finally:
                    shutil.rmtree(snapshot.folder, ignore_errors=True)
            if done:
                return

    def _upload_with_retries(self, snapshot: Snapshot) -> None:
        for attempt in range(self.retries + 1):
            try:
                self._upload(snapshot)
                return
            except Exception as error:  # noqa: BLE001 (any failure is retried, then reported)
                what = f"step {snapshot.step}: {type(error).__name__}: {error}"
                if attempt == self.retries:
                    self.failures.append(what)
                    log.error("checkpoint.remote=%s: upload failed, %d tries (%s)", self.store.url, attempt + 1, what)
                    return
                delay = self.backoff_s * 2**attempt
                log.warning("checkpoint.remote=%s: upload failed (%s); retrying in %.1fs", self.store.url, what, delay)
                time.sleep(delay)

    def _upload(self, snapshot: Snapshot) -> None:
        for local, relative in snapshot.files:  # the checkpoint first, then the logs
            self.store.put(local, relative)
        if snapshot.checkpoint is None:
            return
        size = snapshot.files[0][0].stat().st_size
        self.store.write_pointer(
            {"step": snapshot.step, "path": snapshot.checkpoint, "size": size, "run_id": self.run_id}
        )
        self.uploaded_step = snapshot.step
        self._rotate(snapshot.checkpoint)

    def _rotate(self, newest: str) -> None:
        """Keep the remote's newest ``keep`` step files (the pointer's among them) and drop the
        temporary files a killed upload left; a failure here is only a warning."""
        folder = newest.rsplit("/", 1)[0]
        steps, stale = [], []
        try:
            for relative in self.store.list_files(folder, partial=True):
                name = relative.rsplit("/", 1)[-1]
                if name.endswith(".uploading"):
                    stale.append(relative)
                elif name.startswith("step_") and name.endswith(".pt") and name[5:-3].isdigit():
                    steps.append((int(name[5:-3]), relative))
            old = [relative for _, relative in sorted(steps, reverse=True)[self.keep :] if relative != newest]
            for relative in old + stale:
                self.store.fs.rm_file(self.store.path(relative))
        except Exception as error:  # noqa: BLE001 (the checkpoint and the pointer are already up)
            log.warning("checkpoint.remote=%s: could not prune old checkpoints: %s", self.store.url, error)


def _newest_only(waiting: list[Snapshot]) -> list[Snapshot]:
    """Of the snapshots waiting, the newest checkpoint and the newest logs after it (uploads
    slower than checkpoints skip the older ones); the skipped ones' files are dropped."""
    if not waiting:
        return []
    checkpoints = [i for i, s in enumerate(waiting) if s.checkpoint is not None]
    first = checkpoints[-1] if checkpoints else len(waiting) - 1
    kept = [waiting[first]] + ([waiting[-1]] if len(waiting) - 1 > first else [])
    for snapshot in waiting:
        if all(snapshot is not k for k in kept):
            log.info("checkpoint.remote: skipping the upload of step %d for a newer one", snapshot.step)
            shutil.rmtree(snapshot.folder, ignore_errors=True)
    return kept


def _freeze(source: Path, target: Path, copy: bool = False) -> Path:
    """A snapshot of ``source`` that later writes and rotation leave alone: a hard link
    (checkpoints are never rewritten in place) or a copy (logs grow)."""
    if not copy:
        try:
            os.link(source, target)
            return target
        except OSError:
            pass
    shutil.copy2(source, target)
    return target
