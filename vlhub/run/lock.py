"""The run folder's lock: one run writes a folder at a time.

Rank 0 holds ``run.lock`` (host, pid, SLURM job id, a token and a heartbeat) for the run's life; a
daemon thread refreshes the heartbeat every quarter of ``checkpoint.lock_stale_after_s``. Another
launch fails at once naming the holder, unless the lock is stale (no heartbeat for that long, its
process gone, or this SLURM job's own id after a requeue): then it takes it over, and the run that
lost it stops before its next write (``RunLock.check``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOCK = "run.lock"
STALE_AFTER_S = 120.0  # checkpoint.lock_stale_after_s's default; the heartbeat comes every quarter of it


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (locked, another run's files, a changed config)."""


# -- the lock -----------------------------------------------------------------------------------
def _holder_text(holder: dict[str, Any]) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    job = holder.get("slurm_job_id") or "none"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, SLURM job {job}, heartbeat {age:.0f}s ago"


def _stale_reason(holder: dict[str, Any], stale_after_s: float) -> str | None:
    """Why a lock no longer protects a live run, or None while it does."""
    if time.time() - float(holder.get("heartbeat", 0)) > stale_after_s:
        return f"its heartbeat is older than {stale_after_s:g}s"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"it carries this SLURM job's own id {job} (a requeued job)"
    if holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return "its process is gone"
        except (OSError, ValueError, KeyError):
            pass
    return None


class RunLock:
    """Rank 0's lock on a run folder for the run's life, refreshed by a daemon thread every quarter
    of ``stale_after_s`` (``checkpoint.lock_stale_after_s``: another launch takes it over after that)."""

    def __init__(self, path: Path, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path, self.token, self.stale_after_s = path, uuid.uuid4().hex, stale_after_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="vlhub-run-lock", daemon=True)

    def _payload(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "token": self.token,
            "heartbeat": time.time(),
        }

    @classmethod
    def acquire(cls, path: Path, stale_after_s: float = STALE_AFTER_S) -> RunLock:
        """Take the lock, taking over a stale one; a live holder fails at once, named."""
        if not stale_after_s > 0:
            raise ValueError(f"checkpoint.lock_stale_after_s must be > 0, got {stale_after_s}")
        lock = cls(path, stale_after_s)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock._read()
                if holder is None:  # being written right now, or torn: look again shortly
                    time.sleep(0.2)
                    if lock._read() is None and time.time() - path.stat().st_mtime > stale_after_s:
                        path.unlink(missing_ok=True)
                    continue
                reason = _stale_reason(holder, stale_after_s)
                if reason is None:
                    raise RunFolderError(
                        f"run folder {path.parent} is in use by another run ({_holder_text(holder)}): "
                        f"wait for it to end or use another folder (run.name=... or hydra.run.dir=...); "
                        f"its lock {path} is taken over once the heartbeat is {stale_after_s:g}s old "
                        "(checkpoint.lock_stale_after_s)"
                    ) from None
                log.warning("taking over the lock %s of %s: %s", path, _holder_text(holder), reason)
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(lock._payload(), handle)
            lock._thread.start()
            return lock
        raise RunFolderError(f"could not take the lock {path}: other launches keep replacing it")

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def refresh(self) -> bool:
        """Rewrite the heartbeat while the lock is still ours; False once it was taken over."""
        holder = self._read()
        if holder is None or holder.get("token") != self.token:
            return False
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(self._payload()))
        os.replace(tmp, self.path)
        return True

    def check(self) -> None:
        """Before each write of the run: stop, saying why, once another launch took the lock over
        (this run was suspended or cut off past ``stale_after_s``), so two runs never write one folder."""
        holder = self._read()
        if holder is None or holder.get("token") != self.token:
            self._stop.set()
            taker = _holder_text(holder) if holder is not None else "the lock file is gone"
            raise RunFolderError(
                f"the run lock {self.path} was taken over by another launch ({taker}) after this run's heartbeat "
                f"was older than {self.stale_after_s:g}s (checkpoint.lock_stale_after_s): this run stops "
                "without writing more into the folder"
            )

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            if not self.refresh():
                log.warning("the run lock %s was taken over by another launch", self.path)
                return

    def holds(self) -> bool:
        holder = self._read()
        return holder is not None and holder.get("token") == self.token

    def stop_heartbeat(self) -> None:
        """No refresh after this returns (a heartbeat mid-refresh would write the file again after an
        unlink or a folder's removal); the lock file stays as it is."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def release(self) -> None:
        self.stop_heartbeat()
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
