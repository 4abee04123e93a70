"""Checkpoints in object storage: ``checkpoint.remote=URL`` (any fsspec URL: s3://, gs://, file://).

Rank 0 mirrors the run to the remote in the background: after each checkpoint the trainer
snapshots the checkpoint (a hard link), ``results.jsonl``, ``run.json``, ``config.yaml`` and the
TensorBoard files into ``<run dir>/.remote_upload/step_<N>/`` and queues them; a worker thread
uploads each file under a temporary name, renames it, checks its size, and only then rewrites
the small pointer ``<URL>/latest.json`` (``{"step", "path", "size", "run_id"}``). So the
remote latest only ever names a complete file. A failed upload is retried with exponential
backoff (``checkpoint.remote_retries``, ``checkpoint.remote_backoff_s``) and logged; when the
final checkpoint never reached the remote the run ends with an error. When uploads are slower
than checkpoints, a waiting snapshot is replaced by the newer one.

``checkpoint.resume=auto`` on a run folder without checkpoints (a requeued job on a new node)
downloads the checkpoint ``latest.json`` names, the run's logs and its identity, and the usual
resume path (``run/folder.py``) takes it from there. The launch probes the remote with a
small write, so an unreachable or read-only remote fails before anything trains.

Endpoint and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
...) or ``checkpoint.remote_options`` (keyword arguments of the fsspec filesystem), never from
the URL; ``run/secrets.py`` hides the options' values wherever the config is stored or logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec

from vlhub.errors import ConfigError
from vlhub.run.checkpoint import Checkpointer, read_checkpoint_file
from vlhub.run.secrets import mask_overrides, mask_secrets, scrub_hydra_files  # noqa: F401 (their first home)

log = logging.getLogger(__name__)
POINTER = "latest.json"
REMOTE_CHECKPOINT = re.compile(r"^checkpoints/step_\d+\.pt$")  # the only form a pointer may name
STAGING = ".remote_upload"
LOGS = ("results.jsonl", "run.json", "config.yaml")  # with every file under tensorboard/


class RemoteError(ConfigError):
    """The remote cannot be used (unreachable, not writable, credentials in the URL, another run's),
    or the run's last checkpoint never reached it: one line naming ``checkpoint.remote``."""


# -- the remote store ----------------------------------------------------------------------------
class RemoteStore:
    """One fsspec filesystem and the run's prefix on it; every call names ``checkpoint.remote``."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        parts = urlsplit(url)
        if "@" in parts.netloc or parts.query:
            raise RemoteError(
                "checkpoint.remote must not carry credentials or options (user:secret@ or ?key=): give them "
                "through the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or checkpoint.remote_options"
            )
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **_plain(options or {}))
        except (ImportError, ValueError, TypeError) as error:
            raise RemoteError(f"checkpoint.remote={self.url}: {error}") from None
        self.root = self.root.rstrip("/")
        if getattr(self.fs, "auto_mkdir", None) is False:  # a local or mounted folder: make parents
            self.fs.auto_mkdir = True

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def inside(self, relative: str) -> str:
        """The full path of ``relative``, refused unless it stays under the prefix once ``..`` and, on a
        local or mounted folder, symlinks are resolved: nothing read from the remote points elsewhere."""
        full = posixpath.normpath(self.path(relative))
        if relative.startswith("/") or not full.startswith(f"{self.root}/"):
            raise RemoteError(f"checkpoint.remote={self.url}: {relative!r} leads outside the remote prefix: refused")
        if self.local:
            real, root = os.path.realpath(full), os.path.realpath(self.root)
            if not real.startswith(f"{root}{os.sep}"):
                raise RemoteError(
                    f"checkpoint.remote={self.url}: {relative!r} is a link to {real}, outside the remote prefix: "
                    "refused"
                )
        return full

    @property
    def local(self) -> bool:
        """A local or mounted folder (file://), where a path can be a symlink."""
        return "file" in ((self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol)

    def probe(self) -> None:
        """A small write and delete under the prefix: fails at launch, not after the first checkpoint."""
        target = self.path(f".vlhub-probe-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(target, b"vlhub write probe\n")
            self.fs.rm_file(target)
        except Exception as error:  # noqa: BLE001 (network, permission, missing bucket: all the same to us)
            raise RemoteError(
                f"checkpoint.remote={self.url} is not writable ({type(error).__name__}: {error}); check the "
                "bucket, the endpoint (AWS_ENDPOINT_URL or checkpoint.remote_options) and the credentials"
            ) from None

    def read_pointer(self) -> dict[str, Any] | None:
        try:
            self.fs.invalidate_cache()
            pointer = json.loads(self.fs.cat_file(self.inside(POINTER)))
        except FileNotFoundError:
            return None
        except ValueError as error:
            log.warning("checkpoint.remote=%s: unreadable %s (%s): ignored", self.url, POINTER, error)
            return None
        return pointer if isinstance(pointer, dict) and "path" in pointer else None

    def put(self, local: Path, relative: str) -> None:
        """Upload under a temporary name, rename, and check the size: the name is whole or absent."""
        final, tmp = self.path(relative), self.path(f"{relative}.{uuid.uuid4().hex[:8]}.uploading")
        try:
            self.fs.put_file(str(local), tmp)
            self.fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):  # nothing was written, or the remote is gone
                self.fs.rm_file(tmp)
            raise
        self.fs.invalidate_cache()
        size, expected = self.fs.size(final), local.stat().st_size
        if size != expected:
            raise OSError(f"{final} holds {size} bytes after the upload, expected {expected}")

    def write_pointer(self, pointer: dict[str, Any]) -> None:
        tmp = self.path(f"{POINTER}.{uuid.uuid4().hex[:8]}.uploading")
        self.fs.pipe_file(tmp, json.dumps(pointer).encode())
        self.fs.mv(tmp, self.path(POINTER))

    def get(self, relative: str, local: Path) -> None:
        """Download into a temporary file next to ``local``, then rename it into place."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.download.tmp")
        try:
            self.fs.get_file(self.inside(relative), str(tmp))
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def list_files(self, relative: str, partial: bool = False) -> list[str]:
        """Paths (relative to the prefix) of the files under ``relative``, temporary ones only when
        ``partial``; none when it is absent."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.path(relative))
        except FileNotFoundError:
            return []
        start = len(self.root) + 1
        return [p[start:] for p in found if partial or not p.endswith(".uploading")]


# -- restoring a run on a new node ------------------------------------------------------------------
def restore_from_remote(store: RemoteStore, run_dir: Path, checkpoint_dir: Path, run_id: str | None) -> int | None:
    """Download the newest complete remote checkpoint, the logs and the run identity into an
    empty run folder; returns its step, or None when the remote holds none."""
    pointer = store.read_pointer()
    if pointer is None:
        return None
    if run_id is not None and pointer.get("run_id") not in (None, run_id):
        raise RemoteError(
            f"checkpoint.remote={store.url} holds run {pointer.get('run_id')}, but {run_dir} is run {run_id}: "
            "use another checkpoint.remote prefix for this run"
        )
    relative = str(pointer["path"])
    if not REMOTE_CHECKPOINT.match(relative):
        raise RemoteError(
            f"checkpoint.remote={store.url}: {POINTER} names {relative!r}, not a checkpoint of the form "
            "checkpoints/step_<N>.pt under the prefix: refused (point checkpoint.remote elsewhere, or fix the pointer)"
        )
    log.info("restoring step %s from %s/%s", pointer.get("step"), store.url, relative)
    local = checkpoint_dir / Path(relative).name
    store.get(relative, local)
    size = local.stat().st_size
    if "size" in pointer and size != int(pointer["size"]):
        local.unlink()
        raise RemoteError(
            f"checkpoint.remote={store.url}: {relative} downloaded with {size} "
            f"bytes, {POINTER} says {pointer['size']}: the remote copy is damaged; resume from a local copy "
            "(checkpoint.resume=PATH) or point checkpoint.remote elsewhere"
        )
    for name in LOGS:
        if store.fs.exists(store.path(name)):
            store.get(name, run_dir / name)
    for relative_log in store.list_files("tensorboard"):
        store.get(relative_log, run_dir / relative_log)
    if pointer.get("run_id") and not (run_dir / "run.json").is_file():
        (run_dir / "run.json").write_text(json.dumps({"run_id": pointer["run_id"]}) + "\n")
    return int(pointer.get("step", 0))


# -- the background uploader -------------------------------------------------------------------------
@dataclass
class Snapshot:
    """The files of one checkpoint, frozen when it was saved: (local copy, remote relative path)."""

    step: int
    folder: Path
    checkpoint: str | None  # the relative path of the checkpoint, None for a logs-only sync
    files: list[tuple[Path, str]] = field(default_factory=list)


class RemoteUploader:
    """A worker thread that uploads snapshots in order, newest wins, retrying with backoff."""

    def __init__(self, store: RemoteStore, run_dir: Path, checkpointer: Checkpointer) -> None:
        retries, backoff_s = checkpointer.remote_retries, checkpointer.remote_backoff_s
        if retries < 0 or backoff_s < 0:
            raise ValueError("checkpoint.remote_retries and checkpoint.remote_backoff_s must be >= 0")
        self.store, self.run_dir, self.checkpointer, self.keep = store, run_dir, checkpointer, checkpointer.keep
        self.retries, self.backoff_s = retries, backoff_s
        self.run_id: str | None = None
        self.staging = run_dir / STAGING
        shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run left
        self.queue: queue.Queue[Snapshot | None] = queue.Queue()
        self.failures: list[str] = []
        self.uploaded_step: int | None = None
        self.last_checkpoint_step: int | None = None
        self._thread = threading.Thread(target=self._work, name="vlhub-remote-upload", daemon=True)
        self._thread.start()

    # -- on the training thread ------------------------------------------------------------------------
    def before_decide(self) -> None:
        """Under the run folder's lock, before the run is decided: an empty folder with
        ``resume=auto`` is restored from the remote; a remote holding another run is refused."""
        identity = self.run_dir / "run.json"
        local_id = json.loads(identity.read_text()).get("run_id") if identity.is_file() else None
        if self.checkpointer.resume == "auto" and not self.checkpointer.scan():  # a requeued job on a new node
            restore_from_remote(self.store, self.run_dir, self.checkpointer.folder, local_id)
            return
        pointer, resume = self.store.read_pointer(), self.checkpointer.resume
        fresh = resume is None
        if resume not in (None, "auto"):  # a named file is the run it continues
            local_id = read_checkpoint_file(resume, "checkpoint.resume", mmap=True).get("run_id")
        if pointer is not None and (fresh or pointer.get("run_id") not in (None, local_id)):
            raise RemoteError(
                f"checkpoint.remote={self.store.url} holds another run's checkpoints (run {pointer.get('run_id')}, "
                f"step {pointer.get('step')}) and this launch {'starts a new run' if fresh else 'is not that run'}: "
                "use another checkpoint.remote prefix"
            )

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


def _plain(value: Any) -> Any:
    """Nested mappings (Hydra's DictConfig among them) as plain dicts, for the filesystem's kwargs."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, (list, tuple)) else value


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


# -- the hooks train.py calls --------------------------------------------------------------------------
def open_remote(checkpointer: Checkpointer, run_dir: Path) -> RemoteUploader | None:
    """Rank 0, at launch: probe ``checkpoint.remote`` and start its uploader (None without one)."""
    if not checkpointer.remote:
        return None
    store = RemoteStore(checkpointer.remote, checkpointer.remote_options)
    store.probe()
    return RemoteUploader(store, run_dir, checkpointer)
