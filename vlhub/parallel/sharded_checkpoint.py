"""The sharded checkpoint: a directory ``step_<N>.dcp`` written by every rank at once.

``torch.distributed.checkpoint`` (DCP) writes each rank's shards of the model (both towers, the
replicated temperature and objective heads) and of the optimizer state, under the parameters'
names, plus ``.metadata``; rank 0 adds ``trainer.pt``, everything else a checkpoint holds (step,
schedule, data position, random states, config, run id) in the single file's layout, without
the weights. DCP reshards on load, so a directory written by 2 ranks resumes on 1 or on 4, with
or without FSDP.

Atomic like the single file: every rank writes into ``.step_<N>.dcp.tmp``, rank 0 renames it
once DCP's closing collective says every rank's shards are on disk. A kill before the rename
leaves a temporary directory that the next launch removes (``run_folder.remove_tmp_files``) and
the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vlhub.parallel import collectives, environment

SHARDED_DIR = re.compile(r"^step_(\d+)\.dcp$")
TRAINER_STATE = "trainer.pt"  # inside the directory: the checkpoint without its weights
MARKER = "sharded_dir"  # read_checkpoint_file adds it: where the weights of this header are


def is_sharded_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / TRAINER_STATE).is_file() and (Path(path) / ".metadata").is_file()


def state_root(model: nn.Module, objective: nn.Module) -> nn.Module:
    """One module over the model and the objective: the names the directory stores."""
    return nn.ModuleDict({"model": model, "objective": objective})


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group, even when told so: one process is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _app_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(root), "optimizer": get_optimizer_state_dict(root, optimizer)}


def write_sharded(
    folder: Path,
    step: int,
    root: nn.Module,
    optimizer: torch.optim.Optimizer,
    header: dict[str, Any] | None,
    save_file: Any,
) -> Path:
    """Collective: write ``folder/step_<step>.dcp``; ``header`` (rank 0's, None elsewhere) goes
    into its ``trainer.pt`` through ``save_file(payload, path)`` (an atomic write)."""
    final = folder / f"step_{step}.dcp"
    tmp = folder / f".{final.name}.tmp"
    if environment.rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a killed write's leftovers
    collectives.barrier()
    with _one_process_quiet():  # returns once every rank's shards are written
        dcp.save(_app_state(root, optimizer), checkpoint_id=tmp, no_dist=not environment.is_initialized())
    if environment.rank() == 0:
        save_file(header, tmp / TRAINER_STATE)
        if final.exists():  # the same step saved again: swap, never a moment without a checkpoint
            old = folder / f".{final.name}.{uuid.uuid4().hex}.tmp"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    collectives.barrier()  # every rank returns with the directory in place
    return final


def load_sharded_(path: str | Path, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the weights and optimizer state of the directory ``path`` into ``root`` (sharded or
    not) and ``optimizer``, on any number of ranks (collective when there are several)."""
    state = _app_state(root, optimizer)
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not environment.is_initialized())
    set_model_state_dict(root, state["model"])
    set_optimizer_state_dict(root, optimizer, state["optimizer"])
