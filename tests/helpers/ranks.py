"""Spawned gloo ranks on this machine: a free port, the body of a rank, and a rank that trains.

A rank's function runs in a child process (``mp.spawn`` or a fork), so it lives in an importable
module (here or in its test file) and takes ``(rank, port, ...)``."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch

from tests.helpers.configs import run_train


def free_port() -> int:
    """A TCP port free on this host now (for a test's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_environment(rank: int, port: int, world_size: int = 2) -> None:
    """What torchrun gives each rank on one node."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


@contextlib.contextmanager
def group_torn_down() -> Iterator[None]:
    """One torch thread, and the process group (whoever opened it) torn down on any exit, so a peer is
    not left waiting at a collective."""
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def as_rank(
    rank: int, port: int, world_size: int = 2, *, init: bool = False, timeout_s: float | None = None
) -> Iterator[None]:
    """The body of a spawned rank: torchrun's environment for it, the gloo group opened here when
    ``init`` (else by the code under test), and everything torn down on exit (``group_torn_down``)."""
    set_rank_environment(rank, port, world_size)
    with group_torn_down():
        if init:
            timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size, **timeout)
        yield


def train_as_rank(rank: int, port: int, overrides: list[str], run_dir: str, world_size: int = 2) -> None:
    """One rank of a ``world_size``-rank training run (``mp.spawn(train_as_rank, args=(port, overrides, run_dir))``)."""
    with as_rank(rank, port, world_size):
        run_train(overrides, Path(run_dir))


def start_ranks(main, *args, nprocs: int = 2) -> None:
    """``main(rank, port, *args)`` on ``nprocs`` forked ranks, joined; raises what a rank raised. Forked, the
    ranks inherit this process's imports (torch, vlhub): a spawned rank imports them again, 10-30 s on a
    loaded 2-core machine."""
    import torch.multiprocessing as mp

    mp.start_processes(main, args=(free_port(), *args), nprocs=nprocs, join=True, start_method="fork")
