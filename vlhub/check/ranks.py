"""The distributed rows: ddp and fsdp on every visible GPU against one process.

Each rank is a spawned process that runs ``vlhub.train.train`` itself (process group, strategy,
checkpoint: all as ``torchrun -m vlhub.train`` does it), NCCL on GPUs (gloo on CPU, which is how
the test runs it). N ranks at batch b must end where one process at batch N*b ends: the weights
of their last checkpoints within 1e-5 relative, in fp32 without TF32.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from vlhub.check.rows import FAIL, OK
from vlhub.check.trainers import CheckSettings, compose_train, full_fp32

RowResult = tuple[str, str, dict[str, Any]]
BOUND = 1e-5
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, overrides: list[str], run_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from vlhub.train import train

    try:
        with full_fp32():
            train(compose_train(overrides), Path(run_dir), {"objective": "clip", "model": "tiny"})
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _overrides(settings: CheckSettings, batch_size: int, strategy: str) -> list[str]:
    device = "auto" if settings.device.startswith("cuda") else "cpu"  # auto: cuda:<local rank>
    fp32 = CheckSettings(device, "fp32", batch_size, settings.overrides)
    return fp32.compose_overrides("clip", STEPS, f"trainer.strategy={strategy}", "optim.lr=1e-3")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    return {k: v.double() for k, v in state["state_dict"].items()}


def single_process(settings: CheckSettings, world_size: int, folder: Path) -> Path:
    """One process at the ranks' total batch: the reference the distributed rows compare with."""
    run_dir = folder / "distributed-one-process"
    if not (run_dir / "checkpoints" / "latest.pt").is_file():
        overrides = _overrides(settings, settings.batch_size * world_size, "auto")
        mp.spawn(_rank_main, args=(1, _free_port(), overrides, str(run_dir)), nprocs=1, join=True)
    return run_dir


def distributed_row(settings: CheckSettings, strategy: str, world_size: int, folder: Path) -> RowResult:
    from vlhub.check.correctness import relative_error

    reference = _weights(single_process(settings, world_size, folder))
    run_dir = folder / f"distributed-{strategy}"
    overrides = _overrides(settings, settings.batch_size, strategy)
    mp.spawn(_rank_main, args=(world_size, _free_port(), overrides, str(run_dir)), nprocs=world_size, join=True)
    error = relative_error(_weights(run_dir), reference)
    backend = "nccl" if settings.device.startswith("cuda") else "gloo"
    detail = (
        f"{world_size} ranks ({backend}) at batch {settings.batch_size} vs one process at "
        f"{settings.batch_size * world_size}, {STEPS} steps fp32: weights differ by {error:.2e} (bound {BOUND:.0e})"
    )
    return (OK if error <= BOUND else FAIL), detail, {"relative_error": error, "bound": BOUND, "ranks": world_size}
