"""Who this process is: rank, world size, device, from torchrun's or SLURM's environment, and
joining the process group. Rank-0-only effects are decided by ``DistInfo.is_main``."""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node (they share its cores)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _from_slurm() -> bool:
    """One of several tasks of a SLURM job step (srun, or submitit's tasks) that torchrun did not
    start. A batch script itself is not a step: run there without srun, it is a single process."""
    in_step = "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ
    return "RANK" not in os.environ and in_step and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def slurm_tasks_on_node(tasks_per_node: str, node: int) -> int:
    """This node's task count from ``SLURM_TASKS_PER_NODE`` (``2(x3),1``: 2 on nodes 0-2, 1 on node 3)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node]


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of local rank ``local_rank`` among the ``visible`` ones: its own index when every task
    sees every GPU of the node (torchrun, submitit), 0 when SLURM binds one GPU per task."""
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise ValueError(
        f"trainer.device=cuda: local rank {local_rank} but only {visible} GPUs are visible on this node "
        "(one rank per GPU: lower --nproc_per_node / tasks per node, or give each task one GPU)"
    )


def get_dist_info(device: str = "auto") -> DistInfo:
    """Rank, world size, local rank and device, from torchrun's or SLURM's environment (one or many nodes)."""
    if _from_slurm():
        rank, world_size = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ.get("SLURM_LOCALID", "0"))
        per_node = os.environ.get("SLURM_TASKS_PER_NODE")
        node = int(os.environ.get("SLURM_NODEID", "0"))
        local_world_size = slurm_tasks_on_node(per_node, node) if per_node else world_size
    else:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per local rank
        device = f"cuda:{cuda_index(local_rank, torch.cuda.device_count())}"
    return DistInfo(rank, world_size, local_rank, torch.device(device), local_world_size)


MAX_LOADER_WORKERS = 8  # past this, decoding is rarely what an evaluation waits on


def loader_workers(local_world_size: int | None = None) -> int:
    """DataLoader workers sized to this machine: the cores this process may run on, shared by the
    node's ranks, less one for the rank itself (0 on a single core), at most :data:`MAX_LOADER_WORKERS`.
    ``local_world_size`` defaults to what the launcher's environment says (:func:`get_dist_info`)."""
    ranks = local_world_size if local_world_size is not None else get_dist_info("cpu").local_world_size
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_LOADER_WORKERS, cores // max(1, ranks) - 1))


def _export_slurm_rendezvous() -> None:
    """MASTER_ADDR / MASTER_PORT for a SLURM job's tasks (srun or submitit): the job's first
    node, and a port derived from the job id (the same on every task), unless already set."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    job = SlurmJobEnvironment()  # parses SLURM_JOB_NODELIST; works with or without submitit
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(random.Random(job.job_id).randint(20_000, 60_000)))


def init_distributed(info: DistInfo, timeout_minutes: int = 15) -> None:
    """Join the process group (nccl on GPU, gloo on CPU) when there is more than one rank.

    ``timeout_minutes`` bounds how long a collective waits for a late rank. Every rank now
    evaluates its share (no rank waits through a whole evaluation; rank 0's linear-probe fit is
    waited for with ``broadcast_object(patient=True)``, without this limit), so the longest legitimate
    wait is rank 0 writing a checkpoint while the others reach the next step: minutes for the
    largest towers with their optimizer state on slow storage. 15 minutes covers that, and a rank
    that hangs (NCCL notices no death) stops the others within it; a rank that dies is named
    sooner by :func:`ranks_watched`.
    """
    if not info.distributed or is_initialized():
        return
    if _from_slurm():
        _export_slurm_rendezvous()
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    dist.init_process_group(
        backend="nccl" if info.device.type == "cuda" else "gloo",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0
