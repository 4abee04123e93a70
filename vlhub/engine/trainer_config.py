"""The trainer's keys (``trainer.*``): their one home, types and defaults. A plain dataclass: the
launcher registers it with Hydra's ConfigStore as the schema of ``configs/train.yaml``'s ``trainer``
node (a wrong type fails naming its key); a Python user builds one (``TrainerConfig(max_steps=2)``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def key(default: Any, help: str) -> Any:  # noqa: A002 (the word --help prints)
    """A field with its default and what it does (printed by ``python -m vlhub.train --help``)."""
    if isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class GradCacheConfig:
    enabled: bool = key(False, "true: the gradient of the whole batch from chunks (GradCache)")
    # int | "auto" | None; OmegaConf has no union of int and str, so check() types it.
    chunk_size: Any = key(
        None, "per rank, divides the batch; auto: the largest that fits the GPU (probed; CPU: no cache)"
    )


@dataclass
class TrainerConfig:
    max_steps: int = key(1100, "optimizer steps in the run (a resumed run may raise it)")
    batch_size: int = key(128, "per rank")
    global_batch_size: int | None = key(None, "all ranks together; set: wins over batch_size (= it / ranks)")
    precision: str = key("fp32", "fp32 | amp_bf16 | amp_fp16 | bf16")
    grad_clip_norm: float | None = key(None, "clip the gradients' global norm to this")
    seed: int = key(0, "weights, data order and dropout")
    device: str = key("auto", "auto = cuda:<local rank> when available, else cpu")
    log_every_n_steps: int = key(50, "log the loss, lr and samples/s every n steps")
    compile: bool = key(False, "true: torch.compile the towers (falls back to eager with a warning)")
    compile_strict: bool = key(False, "true: a failed compile is an error instead of a fallback")
    max_nonfinite_steps: int = key(5, "stop after this many steps in a row with a non-finite loss (each skipped)")
    strategy: str = key("auto", "auto (ddp with several ranks) | ddp | fsdp | manual (all-reduce after the backward)")
    grad_cache: GradCacheConfig = key(GradCacheConfig, "")

    def check(self) -> TrainerConfig:
        """What the types cannot say; errors name the key."""
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            raise ValueError(f"trainer.global_batch_size must be > 0 or null, got {self.global_batch_size}")
        for name in ("max_steps", "batch_size", "log_every_n_steps", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"trainer.{name} must be > 0, got {getattr(self, name)}")
        chunk = self.grad_cache.chunk_size
        if not (chunk is None or chunk == "auto" or (isinstance(chunk, int) and not isinstance(chunk, bool))):
            raise ValueError(f"trainer.grad_cache.chunk_size={chunk!r}: expected an integer, auto or null")
        if self.grad_cache.enabled and chunk != "auto" and (chunk is None or chunk <= 0 or self.batch_size % chunk):
            raise ValueError(
                f"trainer.grad_cache.chunk_size={chunk} must be a positive divisor of "
                f"trainer.batch_size={self.batch_size} (both per rank), or auto"
            )
        return self

    def per_rank(self, world_size: int) -> TrainerConfig:
        """``batch_size`` from ``global_batch_size`` when that is set (it wins), for ``world_size`` ranks."""
        if self.global_batch_size is None:
            return self
        if self.global_batch_size > 0 and self.global_batch_size % world_size:
            raise ValueError(
                f"trainer.global_batch_size={self.global_batch_size} does not divide over {world_size} ranks: "
                f"give a multiple of {world_size}, or trainer.batch_size (per rank) instead"
            )
        per_rank = self.global_batch_size // world_size
        log.info(
            "trainer.global_batch_size=%d over %d rank(s): trainer.batch_size=%d",
            self.global_batch_size,
            world_size,
            per_rank,
        )
        return dataclasses.replace(self, batch_size=per_rank)
