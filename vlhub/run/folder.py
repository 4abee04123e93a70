"""A run folder's housekeeping: what it holds, and what a killed or failed launch left in it.

A run folder holds one run: ``run.json`` (its identity, ``run/identity.py``), ``run.lock``
(``run/lock.py``), ``config.yaml`` (the config that trained the weights), ``results.jsonl``,
``checkpoints/`` and the logs. At launch the temporary files of a killed write are removed and the
results a killed run wrote past its last checkpoint are dropped; another run's files can be moved
aside; a launch that fails before training removes the folder Hydra made for it.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from pathlib import Path

from vlhub.run.identity import IDENTITY
from vlhub.run.lock import LOCK, STALE_AFTER_S, RunFolderError, RunLock

log = logging.getLogger(__name__)
RECORD, RESULTS = "config.yaml", "results.jsonl"


def remove_tmp_files(folder: Path) -> None:
    """The temporary files of a write that was killed (``.step_5.pt.x1y2.tmp``, ``.step_5.dcp.tmp/``)."""
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            log.info("removing %s, left by a killed write", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _step_of(line: str) -> int | None:
    """A results.jsonl record's step (0 without one); None for a line torn by a kill."""
    try:
        return int(json.loads(line).get("step") or 0)
    except (ValueError, AttributeError, TypeError):
        return None


def drop_results_after(run_dir: Path, step: int) -> None:
    """Drop ``results.jsonl`` records written past ``step`` (a kill between evaluation and checkpoint)."""
    path = run_dir / RESULTS
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (at := _step_of(line)) is not None and at <= step]
    if len(kept) != len(lines):
        log.info("dropping %d results.jsonl records past step %d", len(lines) - len(kept), step)
        path.write_text("".join(f"{line}\n" for line in kept))


def move_aside(run_dir: Path, files: list[Path] | None = None) -> Path:
    """Move ``files`` (default: everything the previous run left, not Hydra's or the logs) into
    ``<run dir>/moved_<date>/``."""
    target = run_dir / f"moved_{datetime.datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"
    if files is None:
        keep = (".hydra", LOCK)
        files = [
            p
            for p in run_dir.iterdir()
            if p.name not in keep and p.suffix != ".log" and not p.name.startswith("moved_")
        ]
    for path in files:
        destination = target / path.relative_to(run_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), destination)
    log.warning("moved the previous run's files into %s", target)
    return target


def holds_only_launch_files(run_dir: Path) -> bool:
    """Only what Hydra writes at launch (``.hydra/`` and logs) is there: this launch made the folder."""
    return run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())


def remove_failed_launch(
    run_dir: Path, created: bool, lock: RunLock | None = None, stale_after_s: float = STALE_AFTER_S
) -> None:
    """A run folder this launch made (``created``: see :func:`holds_only_launch_files`) where nothing
    trained is removed when the launch fails, so it does not look like a run; only under this launch's
    lock (``lock``, or taken now), so a launch that lost the race for the folder removes nothing."""
    if not created or not (run_dir / ".hydra").is_dir():
        return
    if lock is None or not lock.holds():
        try:
            lock = RunLock.acquire(run_dir / LOCK, stale_after_s)
        except (RunFolderError, OSError):
            return  # another launch holds the folder: its files are not ours
    lock.stop_heartbeat()  # the folder and its lock go together
    try:
        launch_only = {".hydra", IDENTITY, RECORD, LOCK, "checkpoints", "tensorboard"}
        for path in run_dir.iterdir():
            if path.name == "checkpoints" and path.is_dir() and not any(path.iterdir()):
                continue
            if path.name not in launch_only - {"checkpoints"} and path.suffix != ".log":
                return
        shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        lock.release()
