"""The resume decision: what a launch into a run folder is, decided on rank 0 under the folder's lock.

A fresh run (a new run id) or the continuation of the run the folder holds (``run.json``,
``run/identity.py``), from which checkpoint. Checkpoints carry the run id, so another run's
checkpoints in the folder stop a launch (``checkpoint.move_aside=true`` moves them into
``moved_<date>/``). A resumed config is compared with the checkpoint's (``run/config_changes.py``).
The decision is then recorded: ``run.json`` gets this launch, ``config.yaml`` the config that
trains the weights from here (Hydra rewrites ``.hydra/config.yaml`` at every launch, before vlhub
runs), and ``results.jsonl`` loses the records past the resumed step.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlhub.run.checkpoint import read_checkpoint_file, scan_checkpoints
from vlhub.run.config_changes import config_changes
from vlhub.run.folder import RECORD, RESULTS, drop_results_after, move_aside, remove_tmp_files
from vlhub.run.identity import read_run_id, write_identity
from vlhub.run.lock import RunFolderError

log = logging.getLogger(__name__)


@dataclass
class RunStart:
    """What this launch is: the run id, the checkpoint to continue from, whether it is finished."""

    run_id: str
    checkpoint_path: str | None = None
    step: int = 0
    finished: bool = False
    changes: dict[str, list[Any]] = field(default_factory=dict)


def _foreign_message(run_dir: Path, foreign: list[tuple[int, Path, str | None]], why: str) -> str:
    steps = ", ".join(f"{p.name} (run {run_id or 'unknown'}, step {step})" for step, p, run_id in foreign[:4])
    legacy = any(run_id is None for _, _, run_id in foreign)
    hint = " (files without a run id predate run ids: checkpoint.resume=PATH continues one)" if legacy else ""
    return (
        f"run folder {run_dir} holds another run's checkpoints ({steps}) and {why}. Use another folder "
        "(run.name=... or hydra.run.dir=...), or pass checkpoint.move_aside=true to move the old "
        f"files into {run_dir}/moved_<date>/{hint}"
    )


def decide_start(
    run_dir: Path,
    checkpoints: Path,
    resume: str | None,
    config: dict[str, Any],
    move_aside_foreign: bool = False,
    allow_config_change: bool = False,
    defaults: dict[str, Any] | None = None,
) -> RunStart:
    """Rank 0: which run this is and where it continues from (``resume``: ``auto``, None or a path);
    fails on a folder it cannot use. ``checkpoints`` is the run's checkpoint folder; ``defaults``: keys at
    these values that the checkpoint's config lacks are no change (:func:`config_changes`)."""
    remove_tmp_files(checkpoints)
    folder_id = read_run_id(run_dir)
    found = scan_checkpoints(checkpoints)
    header: dict[str, Any] | None = None
    if resume not in (None, "auto"):  # a named file: it must load, and it is the run
        header = read_checkpoint_file(resume, "checkpoint.resume", mmap=True)
        start = RunStart(header.get("run_id") or folder_id or uuid.uuid4().hex, str(resume))
    elif resume == "auto" and folder_id and any(run_id == folder_id for _, _, run_id in found):
        step, path, _ = next(item for item in found if item[2] == folder_id)
        header = read_checkpoint_file(path, "checkpoint", mmap=True)
        start = RunStart(folder_id, str(path))
    else:  # a fresh start: resume=null is always a new run; auto keeps a folder's id with no files
        start = RunStart(folder_id if resume == "auto" and folder_id else uuid.uuid4().hex)
    foreign = [item for item in found if item[2] != start.run_id]
    if foreign:
        why = "this launch starts a new run" if start.checkpoint_path is None else "this run is not theirs"
        if not move_aside_foreign:
            raise RunFolderError(_foreign_message(run_dir, foreign, why))
        move_aside(run_dir, None if start.checkpoint_path is None else [p for _, p, _ in foreign])
    if header is not None:
        if not isinstance(header.get("step"), int) or not isinstance(header.get("config"), dict):
            raise RunFolderError(
                f"checkpoint.resume={start.checkpoint_path} is not a vlhub training checkpoint (no step or "
                "config); to start from its weights, use model.pretrained=PATH with checkpoint.resume=null"
            )
        start.step = header["step"]
        start.changes = config_changes(header["config"], config, defaults)
        if start.changes and not allow_config_change:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in start.changes.items()))
            raise RunFolderError(
                f"checkpoint.resume={resume}: the config differs from the one that trained "
                f"{start.checkpoint_path} (recorded in {run_dir / RECORD}): {listed}. Start a new run in "
                "another folder, or pass checkpoint.allow_config_change=true to continue with the new values "
                "(recorded in results.jsonl)"
            )
        start.finished = start.step >= int(config["trainer"]["max_steps"])
    return start


def record_start(run_dir: Path, start: RunStart, config: dict[str, Any], environment: dict[str, Any]) -> None:
    """Identity and this launch's environment (``run/identity.py``), the config that trains the
    weights from here, and the results trimmed to the step."""
    write_identity(run_dir, start.run_id, {"step": start.step, **environment})
    (run_dir / RECORD).write_text(yaml.safe_dump(config, sort_keys=False))
    drop_results_after(run_dir, start.step)
    if start.changes:
        record = {"step": start.step, "event": "config_changed", "changes": start.changes}
        with (run_dir / RESULTS).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        log.warning("checkpoint.allow_config_change=true: continuing with %s", sorted(start.changes))
