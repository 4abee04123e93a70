"""A run folder holds one run: its identity, its lock, its record, and what a killed run left.

At launch rank 0 locks the folder (``run.lock``, ``run/lock.py``), removes
the temporary files of a killed write, and decides what this start is: a fresh run (a new run
id) or the continuation of the run the folder holds (``run.json``, which also lists each launch's
code revision, torch release, device and number of ranks). Checkpoints carry the run id,
so rotation and auto-resume only look at the run's own files, and another run's checkpoints in
the folder stop a launch (``checkpoint.move_aside=true`` moves them into ``moved_<date>/``).
A resumed config is compared with the checkpoint's: only the keys in ``ALLOWED_ON_RESUME`` may
change unless ``checkpoint.allow_config_change=true`` (recorded in ``results.jsonl``).
``config.yaml`` in the run folder records the config that trained the weights (Hydra rewrites
``.hydra/config.yaml`` at every launch, before vlhub runs).
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlhub.engine.trainer_config import TrainerConfig
from vlhub.parallel.collectives import broadcast_object
from vlhub.parallel.environment import DistInfo
from vlhub.run.checkpoint import Checkpointer, read_checkpoint_file
from vlhub.run.launches import launch_environment
from vlhub.run.lock import LOCK, STALE_AFTER_S, RunFolderError, RunLock

log = logging.getLogger(__name__)
IDENTITY, RECORD, RESULTS = "run.json", "config.yaml", "results.jsonl"
# Keys a resumed run may change without asking (the number of ranks is not in the config).
ALLOWED_ON_RESUME = (
    "trainer.max_steps",
    "trainer.device",
    "trainer.compile*",
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "eval.*",
    "logger.*",
    "checkpoint.*",
    "data.workers",
    "hydra.*",
    "run.name",  # only names the folder
)


# -- the config record ----------------------------------------------------------------------------
def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (an empty mapping is a leaf)."""
    if isinstance(config, dict) and config:
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: config}


def _allowed(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or (p.endswith(".*") and key == p[:-2]) for p in ALLOWED_ON_RESUME)


# Keys a later vlhub added, with their defaults: at the default, a key the stored config lacks is no change.
ADDED_KEYS = flatten({"trainer": dataclasses.asdict(TrainerConfig())})


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """Keys whose value differs (missing on one side counts, unless it is a default of ``ADDED_KEYS``),
    except those allowed on resume."""
    before, after = flatten(old), flatten(new)
    missing = object()
    changed = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, missing), after.get(key, missing)
        if a is missing and key in ADDED_KEYS and b == ADDED_KEYS[key]:
            continue
        if a != b and not _allowed(key):
            changed[key] = [None if a is missing else a, None if b is missing else b]
    return changed


# -- what a start finds and leaves ------------------------------------------------------------------
@dataclass
class RunStart:
    """What this launch is: the run id, the checkpoint to continue from, whether it is finished."""

    run_id: str
    checkpoint_path: str | None = None
    step: int = 0
    finished: bool = False
    changes: dict[str, list[Any]] = field(default_factory=dict)
    lock: RunLock | None = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


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
    lock._stop.set()  # the folder and its lock go together
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


def _foreign_message(run_dir: Path, foreign: list[tuple[int, Path, str | None]], why: str) -> str:
    steps = ", ".join(f"{p.name} (run {run_id or 'unknown'}, step {step})" for step, p, run_id in foreign[:4])
    legacy = any(run_id is None for _, _, run_id in foreign)
    hint = " (files without a run id predate run ids: checkpoint.resume=PATH continues one)" if legacy else ""
    return (
        f"run folder {run_dir} holds another run's checkpoints ({steps}) and {why}. Use another folder "
        "(run.name=... or hydra.run.dir=...), or pass checkpoint.move_aside=true to move the old "
        f"files into {run_dir}/moved_<date>/{hint}"
    )


def _decide(run_dir: Path, checkpointer: Checkpointer, config: dict[str, Any]) -> RunStart:
    """Rank 0: which run this is and where it continues from; fails on a folder it cannot use."""
    remove_tmp_files(checkpointer.folder)
    identity = run_dir / IDENTITY
    folder_id = json.loads(identity.read_text())["run_id"] if identity.is_file() else None
    found = checkpointer.scan()
    header: dict[str, Any] | None = None
    if checkpointer.resume not in (None, "auto"):  # a named file: it must load, and it is the run
        header = read_checkpoint_file(checkpointer.resume, "checkpoint.resume", mmap=True)
        start = RunStart(header.get("run_id") or folder_id or uuid.uuid4().hex, str(checkpointer.resume))
    elif checkpointer.resume == "auto" and folder_id and any(run_id == folder_id for _, _, run_id in found):
        step, path, _ = next(item for item in found if item[2] == folder_id)
        header = read_checkpoint_file(path, "checkpoint", mmap=True)
        start = RunStart(folder_id, str(path))
    else:  # a fresh start: resume=null is always a new run; auto keeps a folder's id with no files
        start = RunStart(folder_id if checkpointer.resume == "auto" and folder_id else uuid.uuid4().hex)
    foreign = [item for item in found if item[2] != start.run_id]
    if foreign:
        why = "this launch starts a new run" if start.checkpoint_path is None else "this run is not theirs"
        if not checkpointer.move_aside:
            raise RunFolderError(_foreign_message(run_dir, foreign, why))
        move_aside(run_dir, None if start.checkpoint_path is None else [p for _, p, _ in foreign])
    if header is not None:
        if not isinstance(header.get("step"), int) or not isinstance(header.get("config"), dict):
            raise RunFolderError(
                f"checkpoint.resume={start.checkpoint_path} is not a vlhub training checkpoint (no step or "
                "config); to start from its weights, use model.pretrained=PATH with checkpoint.resume=null"
            )
        start.step = header["step"]
        start.changes = config_changes(header["config"], config)
        if start.changes and not checkpointer.allow_config_change:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in start.changes.items()))
            raise RunFolderError(
                f"checkpoint.resume={checkpointer.resume}: the config differs from the one that trained "
                f"{start.checkpoint_path} (recorded in {run_dir / RECORD}): {listed}. Start a new run in "
                "another folder, or pass checkpoint.allow_config_change=true to continue with the new values "
                "(recorded in results.jsonl)"
            )
        start.finished = start.step >= int(config["trainer"]["max_steps"])
    return start


def _launches(identity: Path, run_id: str) -> list[dict[str, Any]]:
    """The launches ``run.json`` lists for this run (none for another run's file or an older one)."""
    try:
        held = json.loads(identity.read_text())
    except (OSError, ValueError):
        return []
    launches = held.get("launches") if isinstance(held, dict) and held.get("run_id") == run_id else None
    return launches if isinstance(launches, list) else []


def _record_start(run_dir: Path, start: RunStart, config: dict[str, Any], environment: dict[str, Any]) -> None:
    """Identity and each launch's environment (code, torch, device, ranks: vlhub/run/launches.py),
    the config that trains the weights from here, and the results trimmed to the step."""
    identity = run_dir / IDENTITY
    launches = [*_launches(identity, start.run_id), {"step": start.step, **environment}]
    identity.write_text(json.dumps({"run_id": start.run_id, "launches": launches}) + "\n")
    (run_dir / RECORD).write_text(yaml.safe_dump(config, sort_keys=False))
    drop_results_after(run_dir, start.step)
    if start.changes:
        record = {"step": start.step, "event": "config_changed", "changes": start.changes}
        with (run_dir / RESULTS).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        log.warning("checkpoint.allow_config_change=true: continuing with %s", sorted(start.changes))


def open_run(
    run_dir: Path,
    checkpointer: Checkpointer,
    config: dict[str, Any],
    dist_info: DistInfo,
    before_decide: Callable[[], None] | None = None,
) -> RunStart:
    """Lock the folder and decide the start on rank 0; every rank gets the decision and the
    checkpoint to continue from (read before any model is built). ``before_decide`` runs on
    rank 0 under the lock (``checkpoint.remote`` restores an empty folder there)."""
    start, error = None, None
    if dist_info.is_main:
        lock = RunLock.acquire(run_dir / LOCK, checkpointer.lock_stale_after_s)
        checkpointer.before_write = lock.check  # a run whose lock was taken over writes nothing more
        try:
            if before_decide is not None:
                before_decide()
            checkpointer.check_writable()
            start = _decide(run_dir, checkpointer, config)
            start.lock = lock
            if not start.finished:
                _record_start(run_dir, start, config, launch_environment(dist_info))
        except Exception as caught:
            lock.release()
            error = caught
    decided = None
    if start is not None and error is None:
        decided = (start.run_id, start.checkpoint_path, start.step, start.finished)
    shared = broadcast_object(decided)
    if error is not None:
        raise error
    if shared is None:
        raise RunFolderError(f"rank 0 could not open the run folder {run_dir} (see its log)")
    if start is None:
        start = RunStart(shared[0], shared[1], shared[2], shared[3])
    checkpointer.run_id, checkpointer.opened = start.run_id, True
    if start.checkpoint_path is not None and not start.finished:
        key = "checkpoint.resume" if checkpointer.resume not in (None, "auto") else "checkpoint"
        checkpointer.resume_checkpoint = read_checkpoint_file(start.checkpoint_path, key)
        checkpointer.resume_from = f"{key}={start.checkpoint_path}"
    return start
