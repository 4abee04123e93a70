"""The correctness rows: every objective trains, the gradient cache is exact, compile changes
nothing, a checkpoint reads back bitwise. Each returns ``(status, detail, values)``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vlhub.api import build_model
from vlhub.check.rows import FAIL, OK
from vlhub.check.trainers import (
    CheckSettings,
    build_check_trainer,
    check_checkpointer,
    close,
    full_fp32,
    train_steps,
)
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.step import PlainGradients
from vlhub.engine.trainer import Trainer
from vlhub.run.checkpoint import read_checkpoint_file

RowResult = tuple[str, str, dict[str, Any]]
GRAD_CACHE_BOUND = 1e-5  # SPEC section 4: ||g_cache - g_plain|| / ||g_plain|| in fp32, stochastic layers off
COMPILE_STEPS = 3


def objective_row(settings: CheckSettings, name: str, folder: Path) -> RowResult:
    """Two steps of objective ``name`` at the device's default precision: finite losses, and
    gradients that are not all zero at each optimizer step."""
    trainer = build_check_trainer(settings.compose_overrides(name, 2), folder / f"objective-{name}")
    try:
        losses, grads = train_steps(trainer, 2)
    finally:
        close(trainer)
    values: dict[str, Any] = {"losses": losses, "grad_norms": [g.norm for g in grads]}
    if not grads and trainer.precision.scaler is not None:  # fp16: the scaler may skip the first steps
        return OK, f"loss {losses[0]:.4g} -> {losses[-1]:.4g}; both steps skipped by the fp16 loss scaler", values
    bad = [g for g in grads if g.nonzero == 0 or not math.isfinite(g.norm)]
    if bad or not grads:
        return FAIL, f"gradients are all zero or not finite (norm {bad[0].norm if bad else 0.0:.3g})", values
    last = grads[-1]
    detail = f"loss {losses[0]:.4g} -> {losses[-1]:.4g}; {last.nonzero}/{last.total} tensors with a gradient"
    return OK, detail, values


def _gradients(trainer: Trainer, strategy: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    for module in (trainer.model, trainer.objective):
        module.zero_grad(set_to_none=True)
    strategy(trainer.model, trainer.objective, batch, trainer.precision)
    own = (("objective." + n, p) for n, p in trainer.objective.named_parameters())
    named = [*trainer.model.named_parameters(), *own]
    return {name: p.grad.detach().double().cpu() for name, p in named if p.grad is not None}


def relative_error(mine: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||mine - reference|| / ||reference|| over every tensor as one vector; a missing key is infinite."""
    if mine.keys() != reference.keys():
        return math.inf
    diff = sum(float(((mine[k] - reference[k]) ** 2).sum()) for k in reference)
    return math.sqrt(diff) / max(math.sqrt(sum(float((t**2).sum()) for t in reference.values())), 1e-30)


def grad_cache_row(settings: CheckSettings, folder: Path, objective: str = "clip") -> RowResult:
    """The gradient cache in chunks of a quarter batch against one plain backward on the same batch, fp32."""
    fp32 = CheckSettings(settings.device, "fp32", settings.batch_size, settings.overrides)
    chunk = max(1, settings.batch_size // 4)
    with full_fp32():
        trainer = build_check_trainer(fp32.compose_overrides(objective, 1), folder / "grad-cache")
        try:
            trainer.model.train()
            batch = next(iter(trainer.make_loader(0))).batch
            plain = _gradients(trainer, PlainGradients(), batch)
            cached = _gradients(trainer, GradCache(chunk, settings.batch_size // chunk), batch)
        finally:
            close(trainer)
    error = relative_error(cached, plain)
    detail = (
        f"{objective}, batch {settings.batch_size} in chunks of {chunk}, fp32: "
        f"||g_cache - g_plain|| / ||g_plain|| = {error:.2e} (bound {GRAD_CACHE_BOUND:.0e})"
    )
    return (OK if error <= GRAD_CACHE_BOUND else FAIL), detail, {"relative_error": error, "bound": GRAD_CACHE_BOUND}


def compile_row(settings: CheckSettings, folder: Path, objective: str = "clip") -> RowResult:
    """``trainer.compile`` on and off from the same start on the same batches: the same losses
    (to rounding: 1e-4 relative in fp32, 2e-2 under autocast, where fusion changes bf16 roundings)."""
    losses = {}
    for compiled in (False, True):
        extra = [f"trainer.compile={str(compiled).lower()}", "trainer.compile_strict=true"]
        trainer = build_check_trainer(
            settings.compose_overrides(objective, COMPILE_STEPS, *extra), folder / f"compile-{compiled}"
        )
        try:
            losses[compiled] = train_steps(trainer, COMPILE_STEPS)[0]
        finally:
            close(trainer)
    bound = 1e-4 if settings.precision == "fp32" else 2e-2
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[True], losses[False], strict=True))
    eager = ", ".join(f"{v:.5g}" for v in losses[False])
    detail = f"{objective}, {COMPILE_STEPS} steps: losses {eager}; largest relative difference {worst:.1e}"
    detail += f" (bound {bound:.0e})"
    values = {"eager": losses[False], "compiled": losses[True], "relative_difference": worst, "bound": bound}
    return (OK if worst <= bound else FAIL), detail, values


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def _differences(saved: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """Keys whose values are not bitwise equal (tensors: same dtype, shape and bits)."""
    saved, loaded = _flatten(saved), _flatten(loaded)
    if saved.keys() != loaded.keys():
        return sorted(saved.keys() ^ loaded.keys())
    differ = []
    for key, value in saved.items():
        other = loaded[key]
        if isinstance(value, torch.Tensor):
            same = isinstance(other, torch.Tensor) and value.dtype == other.dtype and value.shape == other.shape
            same = same and torch.equal(value.detach().cpu(), other.detach().cpu())
        else:
            same = value == other or (isinstance(value, float) and math.isnan(value) and math.isnan(other))
        if not same:
            differ.append(key)
    return differ


def checkpoint_row(settings: CheckSettings, folder: Path, objective: str = "clip") -> RowResult:
    """Two steps, then the trainer's own save; the file read back (``weights_only``) holds the model,
    objective and optimizer bitwise, a run resumed from it holds them too, and the model rebuilt
    from it through ``vlhub.load``'s path has the trained weights bitwise."""
    overrides = settings.compose_overrides(objective, 2)
    trainer = build_check_trainer(overrides, folder / "checkpoint")
    try:
        train_steps(trainer, 2)
        path = trainer.save(check_checkpointer(overrides, folder / "checkpoint"))
        expected = {
            "state_dict": trainer.prepared.parallel.model_state_dict(trainer.model),
            "objective": trainer.objective.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "step": trainer.state.step,
        }
    finally:
        close(trainer)
    stored = read_checkpoint_file(path)
    differ = _differences(expected, {key: stored[key] for key in expected})
    resumed_overrides, resumed_dir = [*overrides, f"checkpoint.resume={path}"], folder / "checkpoint-resumed"
    resumed = build_check_trainer(resumed_overrides, resumed_dir)
    try:
        resumed.restore(check_checkpointer(resumed_overrides, resumed_dir))
        differ += [
            f"resumed {k}"
            for k in _differences(
                expected,
                {
                    "state_dict": resumed.prepared.parallel.model_state_dict(resumed.model),
                    "objective": resumed.objective.state_dict(),
                    "optimizer": resumed.optimizer.state_dict(),
                    "step": resumed.state.step,
                },
            )
        ]
    finally:
        close(resumed)
    rebuilt = build_model(path).open_clip_state_dict()
    differ += [f"rebuilt {k}" for k in _differences(expected["state_dict"], rebuilt)]
    size = path.stat().st_size / 2**20
    if differ:
        detail = f"{len(differ)} entries differ after reading back, e.g. {', '.join(differ[:3])}"
        return FAIL, detail, {"differ": differ}
    detail = f"{path.name} ({size:.1f} MiB): model, objective, optimizer bitwise equal when read, resumed and rebuilt"
    return OK, detail, {"path": str(path), "mib": size}
