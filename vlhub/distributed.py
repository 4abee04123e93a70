"""Everything distributed lives here: who am I, start-up, gathers, reductions, rank-0 effects.

Objectives call :func:`gather_features`; the engine calls :func:`get_dist_info` /
:func:`init_distributed` once; rank-0-only effects (logging, checkpoint writing) are decided in one
place, the trainer, by ``DistInfo.is_main``. Evaluation runs on every rank, each encoding a share
(``vlhub.eval.sharding``); under ``trainer.strategy=fsdp`` the towers' forwards are collectives too.
"""

from __future__ import annotations

import _thread
import datetime
import logging
import os
import random
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (registers the autograd-aware all_gather)

R = TypeVar("R")
log = logging.getLogger(__name__)
# The autograd-aware all_gather is deprecated in favour of a private API; it still works.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


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


def _all_sizes(local: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local], device=device))
    return [int(s) for s in sizes]


def gather_features(features: torch.Tensor, *, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """Concatenate ``features`` [B_r, ...] from every rank along dim 0, in rank order.

    Returns the gathered tensor and the offset of this rank's rows in it. Ranks may hold
    different batch sizes (a skipped bad sample); rows are padded for the collective and
    the padding is dropped. With ``with_grad`` the gather is differentiable: every rank
    computes the same global loss, and the all-gather's backward sums each rank's share, so
    DDP's averaged gradient equals the single-process gradient of that loss. Without it,
    only this rank's slice carries gradient (open_clip's ``gather_with_grad=False``).
    """
    if not is_initialized() or world_size() == 1:
        return features, 0
    sizes = _all_sizes(features.shape[0], features.device)
    largest, me = max(sizes), rank()
    padded = torch.nn.functional.pad(features, (0, 0) * (features.ndim - 1) + (0, largest - features.shape[0]))
    if with_grad:
        parts = list(torch.distributed.nn.functional.all_gather(padded))
    else:
        parts = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.detach())
        parts[me] = padded
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]), sum(sizes[:me])


def all_reduce_grads_(
    params: Iterable[torch.nn.Parameter],
    bucket_elements: int = 16_000_000,
    flags: Sequence[torch.Tensor | float] = (),
) -> list[int]:
    """Average the gradients of ``params`` over ranks in place, in flat buckets.

    A parameter without a gradient on this rank counts as zeros, so that every rank reduces the same
    buckets in the same order; one that no rank reached keeps no gradient (as in one process: the
    optimizer skips it rather than decaying it). Each bucket carries one presence flag per parameter.

    ``flags``: small per-rank counts (scalars, on the device or not) summed over ranks in the last
    bucket's collective rather than one of their own (the step's non-finite-loss flag); the sums are
    returned, the same on every rank.
    """
    if not is_initialized() or world_size() == 1:
        return [int(flag) for flag in flags]
    bucket: list[torch.nn.Parameter] = []
    filled = 0
    for param in params:
        if not param.requires_grad:
            continue
        bucket.append(param)
        filled += param.numel()
        if filled >= bucket_elements:
            _all_reduce_bucket(bucket)
            bucket, filled = [], 0
    if bucket or flags:
        return _all_reduce_bucket(bucket, flags)
    return []


def _all_reduce_bucket(bucket: list[torch.nn.Parameter], flags: Sequence[torch.Tensor | float] = ()) -> list[int]:
    device = bucket[0].device if bucket else _collective_device()
    zeros = torch.zeros(max((p.numel() for p in bucket), default=0), device=device)
    grads = [p.grad.reshape(-1).float() if p.grad is not None else zeros[: p.numel()] for p in bucket]
    present = torch.tensor([float(p.grad is not None) for p in bucket], device=device)
    counts = [torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1) for flag in flags]
    flat = torch.cat([*grads, present, *counts])
    dist.all_reduce(flat)
    tail = flat[flat.numel() - len(bucket) - len(counts) :].tolist()  # one device-to-host copy
    reached, sums = tail[: len(bucket)], [round(total) for total in tail[len(bucket) :]]
    flat /= world_size()
    offset = 0
    for param, anywhere in zip(bucket, reached, strict=True):
        mean = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
        if not anywhere:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad.copy_(mean)
    return sums


def all_reduce_sum(values: list[int]) -> list[int]:
    """Element-wise sums of small integer counters over ranks (identical on every rank)."""
    if not is_initialized() or world_size() == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.long, device=_collective_device())
    dist.all_reduce(total)
    return [int(v) for v in total.tolist()]


def _collective_device() -> torch.device:
    """Where collectives run: the current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_gather_rows(rows: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's ``rows`` [n_r, ...] concatenated along dim 0 in rank order, on every rank.

    No gradient. Ranks may hold different numbers of rows, or none (``None``: a rank whose
    share of an evaluation set was empty); rows are padded for the collective and the padding
    is dropped. Returns ``None`` when no rank holds a tensor. The result is on ``rows``'
    device (the CPU where this rank had none).
    """
    if not is_initialized() or world_size() == 1:
        return rows
    shape = None if rows is None else (tuple(rows.shape), rows.dtype)
    shapes = all_gather_object(shape)
    known = [s for s in shapes if s is not None]
    if not known:
        return None
    tail, dtype = known[0][0][1:], known[0][1]
    if any(s[0][1:] != tail or s[1] != dtype for s in known):
        raise ValueError(f"all_gather_rows: ranks hold rows of different shapes or dtypes: {shapes}")
    sizes = [0 if s is None else s[0][0] for s in shapes]
    home = rows.device if rows is not None else torch.device("cpu")
    device = _collective_device()
    padded = torch.zeros((max(sizes), *tail), dtype=dtype, device=device)
    if rows is not None:
        padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(home)


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def broadcast_module_(module: torch.nn.Module, source: int = 0) -> None:
    """Rank ``source``'s parameters and buffers on every rank (identical starting weights)."""
    if not is_initialized() or world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=source)


def all_gather_object(value: R) -> list[R]:
    """Every rank's ``value``, in rank order (a list of one without a process group)."""
    if not is_initialized() or world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: R, source: int = 0, patient: bool = False) -> R:
    """Rank ``source``'s value on every rank (e.g. the run folder).

    ``patient``: ``source`` computes the value first, for longer than the process-group timeout may
    allow (rank 0's linear-probe fit): the others wait in a gloo group without that limit. A rank that
    dies meanwhile is still named within minutes by :func:`ranks_watched`."""
    if not is_initialized() or world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source, group=patient_group() if patient else None)
    return box[0]


PATIENT_TIMEOUT = datetime.timedelta(hours=24)  # a wait on one rank's CPU work (see broadcast_object)
_patient: tuple[Any, Any] | None = None  # (the default group it was made in, the patient group)


def patient_group() -> Any:
    """A gloo group over every rank whose collectives wait :data:`PATIENT_TIMEOUT` (None without a
    process group). Made on first use, a collective itself: call it on every rank together, before
    the long work (as ``vlhub.eval.linear_probe.probe_metrics`` does)."""
    global _patient
    if not is_initialized() or world_size() == 1:
        return None
    world = dist.group.WORLD
    if _patient is None or _patient[0] is not world:  # a new process group: a new patient group
        _patient = (world, dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT))
    return _patient[1]


# -- liveness: which rank stopped ------------------------------------------------------------------
HEARTBEAT_INTERVAL_S = 5.0  # how often each rank says it is alive
SILENT_AFTER_S = 180.0  # a rank silent this long is dead: the others stop (NCCL would wait the whole timeout)


class RankStopped(RuntimeError):
    """A collective failed because another rank died or hangs; the message names it."""


class Heartbeat:
    """Every rank bumps a counter in the rendezvous store (``MASTER_ADDR:MASTER_PORT``, a client of its own)
    every :data:`HEARTBEAT_INTERVAL_S` from a daemon thread, which runs while the main thread waits in a
    collective, and reads everyone's counters.

    Why: when a rank dies, gloo fails the others' next collective at once, but names only a socket
    address; NCCL waits out the process-group timeout. :meth:`silent_ranks` names the ranks whose
    counters stopped; the watcher ends this process when a rank has been silent for
    :data:`SILENT_AFTER_S`, so no rank hangs for hours. A rank that leaves normally says so first.
    """

    LEFT = 10**12  # added to a counter when its rank leaves on purpose

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restart
        self.keys = [f"vlhub/heartbeat/{attempt}/{r}" for r in range(world_size)]
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(minutes=5),
            wait_for_workers=False,
        )
        self.lock, self.explaining, self.interrupted = threading.Lock(), False, False
        self.stopped = threading.Event()
        self.store.add(self.keys[rank], 1)
        self.store.wait(self.keys)  # every rank beats before anyone watches
        self.store.set_timeout(datetime.timedelta(seconds=max(30.0, 6 * HEARTBEAT_INTERVAL_S)))
        self.thread = threading.Thread(target=self._run, name="vlhub-heartbeat", daemon=True)
        self.thread.start()

    def _counts(self) -> list[int]:
        with self.lock:
            return [int(v) for v in self.store.multi_get(self.keys)]

    def _beat(self) -> None:
        with self.lock:
            self.store.add(self.keys[self.rank], 1)

    def _run(self) -> None:
        last, changed = self._counts(), [time.monotonic()] * self.world_size
        while not self.stopped.wait(HEARTBEAT_INTERVAL_S):
            try:
                self._beat()
                counts = self._counts()
            except Exception as error:  # noqa: BLE001 (the store's host is gone)
                return self._give_up(f"the rendezvous store stopped answering ({error}); {self._store_host()}")
            now = time.monotonic()
            changed = [now if c != p else t for c, p, t in zip(counts, last, changed, strict=True)]
            last = counts
            silent = [r for r, t in enumerate(changed) if now - t > SILENT_AFTER_S and last[r] < self.LEFT]
            if silent and not self.explaining:
                return self._give_up(f"rank(s) {silent} stopped responding (no heartbeat for {SILENT_AFTER_S:.0f} s)")

    def _store_host(self) -> str:
        if "TORCHELASTIC_RUN_ID" in os.environ:
            return "torchrun's agent on the first node stopped"
        return "rank 0, which hosts it, stopped"

    def _give_up(self, why: str) -> None:
        if self.stopped.is_set() or self.explaining:
            return
        log.error("rank %d stops: %s", self.rank, why)
        self.interrupted = True
        _thread.interrupt_main()  # a main thread back in Python (gloo) raises; one stuck in NCCL does not
        if not self.stopped.wait(2 * HEARTBEAT_INTERVAL_S):
            os._exit(1)

    def silent_ranks(self) -> list[int] | None:
        """The ranks whose counters do not move for three beats (None: the store itself is unreachable)."""
        self.explaining = True
        try:
            before = self._counts()
            time.sleep(3 * HEARTBEAT_INTERVAL_S)
            after = self._counts()
        except Exception:  # noqa: BLE001
            return None
        return [r for r, (b, a) in enumerate(zip(before, after, strict=True)) if a == b and a < self.LEFT]

    def leave(self, normally: bool = True) -> None:
        """Stop beating. ``normally``: say so, so the others never name this rank; a rank that leaves
        on an error stays silent, and ranks still waiting for it are stopped naming it."""
        self.stopped.set()
        self.thread.join()
        if normally:
            with suppress(Exception):  # leaving anyway
                self.store.add(self.keys[self.rank], self.LEFT)


@contextmanager
def ranks_watched(info: DistInfo) -> Iterator[None]:
    """Run the body with a :class:`Heartbeat`; a failed collective is re-raised naming the rank that stopped."""
    if not info.distributed or not is_initialized() or "MASTER_ADDR" not in os.environ:
        yield
        return
    heartbeat = Heartbeat(info.rank, info.world_size)
    normally = False
    try:
        yield
        normally = True
    except (RuntimeError, KeyboardInterrupt) as error:
        if isinstance(error, KeyboardInterrupt) and not heartbeat.interrupted:
            raise  # Ctrl-C
        if isinstance(error, RankStopped) or not _is_peer_failure(error):
            raise
        silent = heartbeat.silent_ranks()
        if silent is None:
            who = f"the rendezvous store stopped answering: {heartbeat._store_host()}"
        elif silent:
            who = f"rank(s) {silent} stopped responding"
        else:
            raise
        raise RankStopped(f"rank {info.rank} stops: {who} ({type(error).__name__}: {str(error)[:300]})") from error
    finally:
        heartbeat.leave(normally)


def _is_peer_failure(error: BaseException) -> bool:
    """A collective that failed because of another rank (gloo's connection errors, NCCL's, a watcher interrupt)."""
    if isinstance(error, KeyboardInterrupt | dist.DistError):
        return True
    text = str(error).lower()
    return any(mark in text for mark in ("gloo", "nccl", "connection reset", "connection closed", "timed out"))
