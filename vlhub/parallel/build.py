"""``trainer.strategy``: the strategy by name for this launch."""

from __future__ import annotations

from collections.abc import Callable

from vlhub.errors import ConfigError
from vlhub.parallel import environment
from vlhub.parallel.ddp import TowerDDP
from vlhub.parallel.environment import DistInfo
from vlhub.parallel.manual import ManualAllReduce
from vlhub.parallel.strategy import ParallelStrategy


def _fsdp(dist_info: DistInfo, precision: str = "fp32") -> ParallelStrategy:
    from vlhub.parallel.fsdp import FsdpStrategy  # it builds on ParallelStrategy: imported when chosen

    return FsdpStrategy(dist_info, precision)


# Name -> strategy for more than one rank; ``auto`` picks ``ddp`` there and one process otherwise.
STRATEGIES: dict[str, Callable[[DistInfo, str], ParallelStrategy]] = {
    "ddp": TowerDDP,
    "fsdp": _fsdp,
    "manual": ManualAllReduce,
}
NEEDS_PROCESS_GROUP = ("ddp", "fsdp")


def build_parallel(strategy: str, dist_info: DistInfo, precision: str = "fp32") -> ParallelStrategy:
    """The strategy named by ``trainer.strategy`` for this launch; a ConfigError naming the key when it
    cannot run here. Call after ``init_distributed``. ``precision`` is ``trainer.precision`` (FSDP's
    mixed-precision policy follows it)."""
    known = ["auto", *STRATEGIES]
    if strategy not in known:
        raise ConfigError(
            f"trainer.strategy={strategy!r} is not a strategy: one of {', '.join(known)}",
            hint="auto is ddp with several ranks and plain single-process training with one",
        )
    grouped = dist_info.distributed and environment.is_initialized()
    if strategy == "auto":
        strategy = "ddp" if grouped else "none"
    if strategy in NEEDS_PROCESS_GROUP and not grouped:
        raise ConfigError(
            f"trainer.strategy={strategy} needs several processes in a process group, and this run is "
            f"{'one process' if not dist_info.distributed else 'not in a process group'}",
            hint="launch with torchrun --nproc_per_node=N (or SLURM tasks), or use trainer.strategy=auto",
        )
    if strategy == "none":
        return ParallelStrategy(dist_info, precision)
    return STRATEGIES[strategy](dist_info, precision)
