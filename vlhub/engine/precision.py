"""Numeric precision of a run: autocast, parameter dtype, and the fp16 loss scaler."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16", "bf16")


class Precision:
    """``fp32``; ``amp_bf16`` / ``amp_fp16`` (autocast, fp16 with a GradScaler); ``bf16`` (pure)."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in PRECISIONS:
            raise ValueError(f"trainer.precision={name!r} is not one of {', '.join(PRECISIONS)}")
        self.name, self.device = name, device
        self.scaler = torch.amp.GradScaler(device.type) if name == "amp_fp16" else None

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(self.name)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                yield

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step; False when the fp16 loss scaler skipped it (an inf or NaN gradient): the
        scaler then lowers its scale, which is how the skip is read (its own flag is private)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale
