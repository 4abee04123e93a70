"""Restoring a run from ``checkpoint.remote`` on a new node, under the run folder's lock.

``checkpoint.resume=auto`` on a run folder without checkpoints (a requeued job on a new node)
downloads the checkpoint ``latest.json`` names, the run's logs and its identity, and the resume
decision (``run/resume.py``) takes it from there. A remote that holds another run is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlhub.run.checkpoint import read_checkpoint_file, scan_checkpoints
from vlhub.run.identity import IDENTITY, read_run_id, write_identity
from vlhub.run.remote_store import LOGS, POINTER, REMOTE_CHECKPOINT, RemoteError, RemoteStore

log = logging.getLogger(__name__)


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
    if pointer.get("run_id") and not (run_dir / IDENTITY).is_file():
        write_identity(run_dir, pointer["run_id"])
    return int(pointer.get("step", 0))


def restore_or_refuse(store: RemoteStore, run_dir: Path, checkpoints: Path, resume: str | None) -> None:
    """Before the run is decided: an empty checkpoint folder with ``resume=auto`` is restored from the
    remote; a remote holding another run than the one this launch starts or continues is refused."""
    local_id = read_run_id(run_dir)
    if resume == "auto" and not scan_checkpoints(checkpoints):  # a requeued job on a new node
        restore_from_remote(store, run_dir, checkpoints, local_id)
        return
    pointer, fresh = store.read_pointer(), resume is None
    if resume not in (None, "auto"):  # a named file is the run it continues
        local_id = read_checkpoint_file(resume, "checkpoint.resume", mmap=True).get("run_id")
    if pointer is not None and (fresh or pointer.get("run_id") not in (None, local_id)):
        raise RemoteError(
            f"checkpoint.remote={store.url} holds another run's checkpoints (run {pointer.get('run_id')}, "
            f"step {pointer.get('step')}) and this launch {'starts a new run' if fresh else 'is not that run'}: "
            "use another checkpoint.remote prefix"
        )
