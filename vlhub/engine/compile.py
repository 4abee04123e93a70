"""``trainer.compile``: torch.compile on the towers, with a fallback to eager when compiling fails.

What is compiled: what each tower says holds its compute (``Tower.compile_units()``: the open_clip
or timm module it wraps), not the objective's ``represent``. ``represent`` has Python-side control
flow (views, token switches, dict outputs) that would break the graph or guard on every objective's
attributes, and the temperature and loss are cheap; the towers hold nearly all the
FLOPs and are the same for every objective. The gradient cache calls the towers under ``no_grad``
(first pass) and with gradients (replay): dynamo keeps one graph for each, so the first cached step
compiles twice; evaluation (eval mode, no grad) is a third graph.

Compiled in place with ``nn.Module.compile``: the module stays where it was, so state_dict keys
never carry torch.compile's ``_orig_mod.`` prefix and checkpoints are the same with compile on or off.

Random ops: ``fallback_random`` makes the compiled graphs draw random numbers with the same aten
calls as eager code, from the same CPU/CUDA generators. The gradient cache restores those generators
before each replay (vlhub/engine/grad_cache.py), so a replay reproduces its first pass although the
no-grad and the grad graph are different compiled programs (inductor's own random kernels would
seed each graph on its own), and a compiled run draws the same patch-dropout masks as an eager one.

Compiling is lazy: it happens in the first call, i.e. in the first training step. The trainer runs
that step through :meth:`CompiledTowers.run`, which times it (logged once) and, when compiling fails,
returns the towers to eager with one warning and reruns the step (or raises, under
``trainer.compile_strict``). Kept apart from the trainer so it can be ordered around a DDP wrapper.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from torch import nn

from vlhub.run.checkpoint import capture_rng_state, restore_rng_state


class Compilable(Protocol):
    """What compiling needs of a model (``VisionLanguageModel`` is one): the modules holding its compute."""

    def compile_units(self, per_block: bool = False) -> list[nn.Module]: ...


log = logging.getLogger(__name__)

T = TypeVar("T")


def compile_towers(model: Compilable | list[nn.Module], backend: str | Callable = "inductor") -> list[nn.Module]:
    """Compile the towers (or the given modules) in place (lazily: the first forward compiles);
    returns the compiled modules."""
    modules = model if isinstance(model, list) else model.compile_units()
    options = {"fallback_random": True} if backend == "inductor" else None  # see the module docstring
    for module in modules:
        module.compile(backend=backend, options=options)
    return modules


def uncompile(modules: list[nn.Module]) -> None:
    """Back to eager: ``nn.Module.compile`` only set this attribute."""
    for module in modules:
        module._compiled_call_impl = None


class CompiledTowers:
    """A model's towers compiled in place; runs training steps, falling back to eager on a compile error."""

    def __init__(self, model: Compilable | list[nn.Module], strict: bool, backend: str | Callable = "inductor") -> None:
        self.strict = strict
        self.modules = compile_towers(model, backend)
        self.compile_seconds: float | None = None  # the first step's time, compiling included

    @property
    def active(self) -> bool:
        return any(module._compiled_call_impl is not None for module in self.modules)

    def run(self, step: Callable[[], T], reset: Callable[[], Any]) -> T:
        """``step()``; on a compile error (in the first step, or a recompile later): ``reset()`` (drop
        partial gradients), restore the random state, go eager and run the step again."""
        if not self.active:
            return step()
        from torch._dynamo.exc import TorchDynamoException  # here: importing dynamo costs seconds

        rng = capture_rng_state()
        start = time.perf_counter()
        try:
            result = step()
        except TorchDynamoException as error:
            if self.strict:
                raise RuntimeError(
                    f"torch.compile of the towers failed (trainer.compile_strict=true): {_first_line(error)}"
                ) from error
            log.warning(
                "torch.compile of the towers failed, training eagerly instead (trainer.compile_strict=true "
                "makes this an error): %s",
                _first_line(error),
            )
            uncompile(self.modules)
            reset()
            restore_rng_state(rng)
            return step()
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
            log.info("compiled the towers: the first step took %.1f s", self.compile_seconds)
        return result


def _first_line(error: BaseException) -> str:
    """The error in one line; for a backend failure, the backend's own error (dynamo's wrapper says
    only which backend raised)."""
    inner = getattr(error, "inner_exception", None)
    error = inner if inner is not None else error
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
