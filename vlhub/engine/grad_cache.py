"""Exact gradient caching (GradCache, Gao et al. 2021) as a gradient strategy.

For a batch of B split into chunks of C:
1. ``represent`` every chunk without gradients, recording the random state before each;
2. ``loss`` once on the concatenated representations, backward to the representations
   (and to the loss-only parameters: the temperature, heads that see the whole batch);
3. per chunk, restore its random state, replay ``represent`` with gradients and backward the
   cached representation gradients, accumulating into ``.grad``.
Peak activation memory follows C, not B; the price is a second forward per chunk. Parameters
used only in ``loss`` get their gradient once, in step 2. Under data parallelism every replay but
the last runs under ``no_sync()``: the DDP-wrapped towers accumulate locally and all-reduce the
sum in the last chunk's backward; the rest is averaged once per step (``train_step``). The
no-grad first pass runs the towers bare (``VisionLanguageModel.forward``): no DDP bookkeeping.

Input: the batch stays on the host (pinned on CUDA, images uint8); in each pass chunk k+1 is
copied to the device while chunk k runs (``vlhub.engine.prefetch``), so about two chunks of input
are on the device at a time, and each chunk is normalised there (``device_batch``).

BatchNorm: running statistics are snapshotted before the no-grad pass and restored after it,
so they are updated once per chunk (by the replay), as with plain gradient accumulation.
Batch statistics are per chunk, so BatchNorm towers do not reproduce a full-batch gradient.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vlhub.data.batch import Batch, batch_size_of, slice_batch
from vlhub.engine.precision import Precision
from vlhub.engine.prefetch import prefetch
from vlhub.engine.step import NoSync, device_batch
from vlhub.objectives.base import Objective


class RandomState:
    """CPU and current-CUDA-device generator states, captured and restored for replay."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def running_stats(model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    return [
        (module, {name: buf.clone() for name, buf in module.named_buffers(recurse=False) if buf is not None})
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]


def restore_running_stats(saved: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    for module, buffers in saved:
        for name, value in buffers.items():
            getattr(module, name).copy_(value)


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A representation the loss differentiates: float ones get a gradient, masks and ids do not."""
    tensor = tensor.detach()
    return tensor.requires_grad_() if tensor.is_floating_point() else tensor


class GradCache:
    """Gradient of one step at the whole batch, computed ``chunk_size`` samples at a time."""

    batch_on_device = False  # chunks travel one at a time, the next one prefetched

    def __init__(self, chunk_size: int, chunks_per_step: int | None = None) -> None:
        if chunk_size <= 0:
            raise ValueError(f"trainer.grad_cache.chunk_size must be > 0, got {chunk_size}")
        self.chunk_size = chunk_size
        self.chunks_per_step = chunks_per_step  # trainer.batch_size / chunk_size, when the trainer builds it
        self.min_samples = chunks_per_step or 1  # a chunk cannot be empty (open_clip's towers refuse it)

    def chunks(self, batch: Batch) -> list[Batch]:
        """``chunk_size`` samples each. A batch short of samples (bad ones skipped) is still cut into
        ``chunks_per_step`` chunks, so every rank runs as many forwards: under FSDP2 each is a
        collective (an all-gather per block), and ranks running different counts would hang. A batch
        with fewer samples than that is skipped on every rank by the trainer (``min_samples``)."""
        size = batch_size_of(batch)
        if self.chunks_per_step is not None:  # a full batch: bounds fall every chunk_size samples
            count = self.chunks_per_step
            bounds = [size * index // count for index in range(count + 1)]
            return [slice_batch(batch, start, stop) for start, stop in zip(bounds, bounds[1:], strict=False)]
        return [
            slice_batch(batch, start, min(start + self.chunk_size, size)) for start in range(0, size, self.chunk_size)
        ]

    def __call__(
        self,
        model: nn.Module,
        objective: Objective,
        batch: Batch,
        precision: Precision,
        no_sync: NoSync = contextlib.nullcontext,
    ) -> dict[str, torch.Tensor]:
        chunks = self.chunks(batch)  # kept where they are; each moves to the device when it runs
        device = precision.device
        saved_stats = running_stats(model)
        states, cached = [], []
        with torch.no_grad(), precision.autocast():
            for chunk in prefetch(chunks, device):
                states.append(RandomState(device))
                cached.append(objective.represent(model, device_batch(chunk, model, precision)))
        restore_running_stats(saved_stats)

        reps = {key: _leaf(torch.cat([c[key] for c in cached])) for key in cached[0]}
        with precision.autocast():
            parts = objective.loss(reps, model)
        precision.scale(parts["loss"]).backward()
        after_loss = RandomState(device)

        offsets = [0]
        for chunk in chunks:
            offsets.append(offsets[-1] + batch_size_of(chunk))
        for index, chunk in enumerate(prefetch(chunks, device)):
            states[index].restore()
            # DDP decides in the forward whether the backward syncs: both go under no_sync.
            with no_sync() if index < len(chunks) - 1 else contextlib.nullcontext():
                with precision.autocast():
                    replay = objective.represent(model, device_batch(chunk, model, precision))
                keys = [k for k in replay if reps[k].grad is not None and replay[k].requires_grad]
                start, stop = offsets[index], offsets[index + 1]
                torch.autograd.backward([replay[k] for k in keys], [reps[k].grad[start:stop] for k in keys])
        after_loss.restore()  # the run's random stream continues as if each chunk ran once
        return {name: value.detach() for name, value in parts.items()}
