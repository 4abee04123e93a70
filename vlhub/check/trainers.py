"""Trainers for the check, built the way ``python -m vlhub.train`` builds them.

The config is the real YAML composed with Hydra's compose API (``configs/train.yaml`` plus the
check's overrides), and every component comes from ``vlhub.train.build_trainer``: what the check
runs is what training runs. The run folder is a plain folder under the check's (no lock, no
remote copies: nothing here is resumed by a later launch).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from vlhub.engine.trainer import Trainer
from vlhub.run.checkpoint import Checkpointer
from vlhub.train import build_trainer, config_of, trainer_settings


def default_precision(device: torch.device) -> str:
    """bf16 autocast on GPUs that have it (fp16 autocast with a scaler on older ones), fp32 on CPU."""
    if device.type == "cuda":
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    return "fp32"


@dataclass
class CheckSettings:
    """What every row's trainer shares: the device, precision, batch and the user's overrides."""

    device: str  # cpu | cuda | cuda:N
    precision: str
    batch_size: int
    overrides: list[str] = field(default_factory=list)  # Hydra overrides applied to every row (model size...)

    def compose_overrides(self, objective: str, steps: int, *extra: str) -> list[str]:
        """The rows' common settings: no evaluation, no logger files, no background loader workers,
        a constant lr (the first steps move the weights), a non-finite loss fails at once."""
        return [
            f"objective={objective}",
            f"trainer.device={self.device}",
            f"trainer.precision={self.precision}",
            f"trainer.batch_size={self.batch_size}",
            f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1",
            "trainer.max_nonfinite_steps=1",
            "data.workers=0",
            "eval=none",
            "logger.tensorboard=false",
            "checkpoint.every_n_steps=0",
            "checkpoint.resume=null",
            "optim.scheduler=constant",
            "optim.warmup_steps=0",
            *self.overrides,
            *extra,
        ]


def compose_train(overrides: list[str]) -> DictConfig:
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """One compose per set of overrides for the check's process (a row builds its trainer and its
    checkpointer from the same ones; a compose is about 0.1 s); callers get a deep copy."""
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _choices(overrides: list[str]) -> dict[str, str]:
    groups = ("model", "objective", "data", "augment", "optim", "eval")
    chosen = dict(o.split("=", 1) for o in overrides if "=" in o and o.split("=", 1)[0] in groups)
    return {"model": "tiny", "objective": "clip", "data": "synthetic", **chosen}


def build_check_trainer(overrides: list[str], run_dir: Path) -> Trainer:
    """A trainer as ``vlhub.train.train`` builds it from ``configs/train.yaml`` and ``overrides``."""
    cfg = compose_train(overrides)
    config, dist_info, parallel = trainer_settings(cfg)
    choices, stored = _choices(overrides), config_of(cfg)
    checkpointer = check_checkpointer(overrides, run_dir)
    return build_trainer(cfg, config, run_dir, choices, overrides, dist_info, parallel, checkpointer, stored)


def check_checkpointer(overrides: list[str], run_dir: Path) -> Checkpointer:
    """What a check trainer built with these ``overrides`` saves through and resumes from: a plain
    checkpoint folder (no run session, so no lock and no remote copies)."""
    files = compose_train(overrides).checkpoint
    return Checkpointer(run_dir / "checkpoints", files.every_n_steps, files.keep, files.resume)


def close(trainer: Trainer) -> None:
    if trainer.metric_logger is not None:
        trainer.metric_logger.close()


@dataclass
class GradientSummary:
    """The gradients the optimizer is about to apply: how many tensors have a non-zero one, and the norm."""

    nonzero: int
    total: int
    norm: float


def summarise_gradients(optimizer: torch.optim.Optimizer) -> GradientSummary:
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return GradientSummary(0, len(params), 0.0)
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    return GradientSummary(int((norms > 0).sum()), len(params), float(torch.linalg.vector_norm(norms)))


class NonFiniteLoss(RuntimeError):
    pass


def train_steps(trainer: Trainer, steps: int) -> tuple[list[float], list[GradientSummary]]:
    """``steps`` of the trainer's own step on its own loader: the losses, and the gradients each
    optimizer step saw (read by a hook just before it, after unscaling and clipping)."""
    summaries: list[GradientSummary] = []
    hook = trainer.optimizer.register_step_pre_hook(lambda opt, *_: summaries.append(summarise_gradients(opt)))
    loader = iter(trainer.make_loader(0))
    trainer.model.train()
    losses = []
    try:
        for step in range(1, steps + 1):
            parts = trainer.train_on_batch(next(loader).batch)
            if parts is None:  # the trainer drops a non-finite step; here that is the row's failure
                raise NonFiniteLoss(f"the loss is not finite at step {step}")
            losses.append(float(parts["loss"]))
            trainer.state.step += 1
    finally:
        hook.remove()
    return losses, summaries


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 (CUDA), for the rows that compare to a bound."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
