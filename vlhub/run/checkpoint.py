"""Atomic, ``weights_only``-loadable checkpoints and finding the newest complete one.

Layout of a checkpoint (all plain containers and tensors):
``state_dict`` (model weights under open_clip's names), ``objective``, ``optimizer``,
``scaler``, ``scheduler``, ``step``, ``epoch``, ``data`` (position and bad-sample counts),
``rng`` (as tensors), ``config`` (a plain dict), ``open_clip_model_cfg``, and ``run_id``: the
run that wrote it. Rotation and auto-resume only consider the run's own files
(``run/resume.py`` decides which run a folder holds; ``run/session.py`` binds the checkpointer to it).

Under ``trainer.strategy=fsdp`` each save also writes the sharded directory ``step_<N>.dcp``
(``parallel/sharded_checkpoint.py``); reading it gives its ``trainer.pt`` (this layout without the
weights) with ``sharded_dir`` naming where the weights are. At the same step the directory is
preferred for resuming (each rank reads only its shards); rotation removes a step's file and
directory together.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlhub.errors import ConfigError
from vlhub.parallel.sharded_checkpoint import MARKER, SHARDED_DIR, TRAINER_STATE, is_sharded_dir, write_sharded

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
LATEST = "latest.pt"
MISMATCH = ("size mismatch", "Missing key", "Unexpected key")  # how torch's load_state_dict says it


class CheckpointError(ConfigError, RuntimeError):
    """A checkpoint file that cannot be read (truncated, or not a file ``torch.save`` wrote), or
    written (no space left): one line naming the key or the file, no traceback (``vlhub.launch``)."""


def read_checkpoint_file(path: str | Path, key: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint as plain containers (``weights_only``, on CPU), or an error naming ``key`` and
    the file. ``mmap`` maps the tensors instead of reading them: a cheap look at step and run id.
    A sharded directory gives its ``trainer.pt`` with ``sharded_dir`` set to the directory."""
    if is_sharded_dir(path):
        return {**read_checkpoint_file(Path(path) / TRAINER_STATE, key, mmap), MARKER: str(path)}
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}={path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch's own message suggests weights_only=False: never do that
        raise CheckpointError(
            f"{key}={path} is not a readable checkpoint (truncated, or not a file torch.save wrote: "
            f"{type(error).__name__}); point {key} at another file"
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{key}={path} holds a {type(loaded).__name__}, not a checkpoint dict")
    return loaded


def capture_rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()  # ("MT19937", keys, pos, has_gauss, cached_gaussian)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": torch.tensor(state, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached))


def restore_rank_rng_state(per_rank: list[dict[str, Any]], rank: int, world_size: int, reseed: int) -> None:
    """This rank's random streams from a checkpoint's ``rng_per_rank``. Written by another number of
    ranks: rank 0 continues its stream, the others start their own (seeded by ``reseed`` and the rank)."""
    if len(per_rank) == world_size:
        restore_rng_state(per_rank[rank])
        return
    restore_rng_state(per_rank[0])
    if rank > 0:
        torch.manual_seed(reseed + 1_000_003 * rank)


@contextlib.contextmanager
def weights_from(where: str) -> Iterator[None]:
    """Loading the weights of ``where`` (``checkpoint.resume=PATH``): a tensor of another shape, or a
    missing or extra one, fails naming the file and the tensor (torch names only the tensor)."""
    try:
        yield
    except (RuntimeError, KeyError) as error:
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        found = [line for line in lines if line.startswith(MISMATCH) or "does not match this model" in line]
        if isinstance(error, CheckpointError) or not found:
            raise
        raise CheckpointError(f"{where} does not fit this model: {found[0]}") from None


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if _no_space(error):  # torch says "enforce fail at inline_container.cc"; the cause is chained
            raise CheckpointError(
                f"no space left on device writing the checkpoint {path} (nothing of it was kept; the previous "
                "checkpoints are whole): free space, or lower checkpoint.keep, and resume"
            ) from error
        raise


def _no_space(error: BaseException | None) -> bool:
    """Whether ``error`` or an error in its chain is a full disk or quota."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _link_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # filesystems without hard links: copy instead
        save_atomic(torch.load(source, weights_only=True), target)
        return
    os.replace(tmp, target)


def step_files(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step files and sharded directories in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := STEP_FILE.match(p.name)) or ((m := SHARDED_DIR.match(p.name)) and p.is_dir())
    ]
    return sorted(found, reverse=True)


def scan_checkpoints(folder: Path) -> list[tuple[int, Path, str | None]]:
    """(step, file, run id) of every readable checkpoint in ``folder``, ``latest.pt`` included, newest
    first; torn or foreign-format files are skipped with a warning."""
    files = [path for _, path in step_files(folder)]
    if (folder / LATEST).is_file():
        files.append(folder / LATEST)
    found = []
    for path in files:
        try:
            header = read_checkpoint_file(path, "checkpoint", mmap=True)
            found.append((int(header["step"]), path, header.get("run_id")))
        except (CheckpointError, OSError, KeyError, TypeError, ValueError) as error:
            log.warning("skipping unreadable checkpoint %s: %s", path, error)
    # Newest step first; at one step the sharded directory, then the step file, then latest.pt.
    return sorted(found, key=lambda item: (item[0], item[1].is_dir(), item[1].name != LATEST), reverse=True)


class Checkpointer:
    """Writes ``step_<N>.pt`` and ``latest.pt`` under ``<run dir>/checkpoints``, keeps the run's
    newest ``keep``. ``run_id`` (the run that writes, stamped into every checkpoint) and
    ``before_write`` (called before each write; raises to refuse it) come from :meth:`for_run`, once
    the run is decided (``run/session.py``)."""

    def __init__(
        self,
        folder: Path,
        every_n_steps: int,
        keep: int,
        resume: str | None,
        run_id: str | None = None,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"checkpoint.every_n_steps must be >= 0, got {every_n_steps}")
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        if resume not in (None, "auto") and not Path(resume).is_file() and not is_sharded_dir(resume):
            raise FileNotFoundError(
                f"checkpoint.resume={resume}: no such file or sharded checkpoint directory (use 'auto' or a path)"
            )
        self.folder, self.every_n_steps, self.keep, self.resume = folder, every_n_steps, keep, resume
        self.run_id, self.before_write = run_id, before_write
        self.resume_from = "checkpoint.resume"  # ``KEY=PATH`` of the file resumed from, for the messages

    def for_run(self, run_id: str, before_write: Callable[[], None] | None) -> Checkpointer:
        """The same folder and settings, writing for ``run_id``; ``before_write`` guards each write
        (the run folder's lock: a run that lost its folder writes nothing more)."""
        return Checkpointer(self.folder, self.every_n_steps, self.keep, self.resume, run_id, before_write)

    def check_writable(self) -> None:
        """At launch: an existing checkpoint folder that cannot be written fails now, not at the
        first checkpoint (a missing one is made in the run folder, which the launch already wrote)."""
        if not self.folder.is_dir():
            return
        try:
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".write-probe.", suffix=".tmp"):
                pass
        except OSError as error:
            raise CheckpointError(
                f"the checkpoint folder {self.folder} is not writable ({error.strerror or error}): fix its "
                "permissions, or use another run folder (run.name=... or hydra.run.dir=...)"
            ) from None

    def due(self, step: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def scan(self) -> list[tuple[int, Path, str | None]]:
        return scan_checkpoints(self.folder)

    def save(self, payload: dict[str, Any]) -> Path:
        if self.before_write is not None:
            self.before_write()
        path = self.folder / f"step_{payload['step']}.pt"
        save_atomic({**payload, "run_id": self.run_id}, path)
        _link_atomic(path, self.folder / LATEST)
        own = [(step, p) for step, p, run_id in self.scan() if run_id == self.run_id and p.name != LATEST]
        kept = sorted({step for step, _ in own}, reverse=True)[: self.keep]
        for step, old in own:  # another run's files are never this run's to delete
            if step in kept:
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        return path

    def save_sharded(
        self, step: int, root: nn.Module, optimizer: torch.optim.Optimizer, header: dict[str, Any] | None
    ) -> Path:
        """Collective: the sharded directory ``step_<step>.dcp``; ``header`` is rank 0's checkpoint
        without its weights (None on the other ranks). Call before :meth:`save`, which rotates."""
        payload = None if header is None else {**header, "run_id": self.run_id}
        return write_sharded(self.folder, step, root, optimizer, payload, save_atomic)

    def load_for_resume(self) -> dict[str, Any] | None:
        """The named file, or for ``auto`` the newest of this run's checkpoints that loads (``latest.pt``
        included). A run session decides this once, at launch, and offers its own ``load_for_resume``."""
        if self.resume is None:
            return None
        if self.resume != "auto":  # a named file must load: never fall back to a fresh run
            return read_checkpoint_file(self.resume, "checkpoint.resume")
        return self.load_newest({self.run_id})

    def load_newest(self, run_ids: set[str | None]) -> dict[str, Any] | None:
        """The newest checkpoint of one of ``run_ids`` that loads completely."""
        for _, path, run_id in self.scan():
            if run_id not in run_ids:
                continue
            try:
                return read_checkpoint_file(path, "checkpoint")
            except CheckpointError as error:  # a file from an older, killed writer: try the next
                log.warning("skipping unreadable checkpoint %s: %s", path, error)
        return None
