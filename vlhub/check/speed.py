"""The speed rows: samples/s of vlhub's step against open_clip's in the same run, MFU, the gradient
cache's cost, and whether the input pipeline or the device is the ceiling.

Every vlhub row times the trainer's own step (``Trainer.train_on_batch``: compile, fused optimizer,
gradient strategy as the config sets them) on a fixed batch already on the device, so the loader
is out of it; the input rows time the loader alone. MFU = samples/s x FLOPs per sample (counted
by ``FlopCounterMode`` over one eager forward + backward) / a peak: a square matmul timed in this
run, and the device's datasheet dense peak when the device is known.

On a GPU: ViT-B/32 (``model=vit_b32``) at batch 512 under the default precision, the gradient
cache at logical 32,768 in chunks of 512. On a CPU: the correctness rows' model at batch 16, the
gradient cache at 64 in chunks of 16: CPU figures, which say nothing about a GPU.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from vlhub.check.rows import INFO, OK, UNTESTED
from vlhub.check.trainers import CheckSettings, build_check_trainer, close
from vlhub.engine.step import PlainGradients
from vlhub.engine.trainer import Trainer

RowResult = tuple[str, str, dict[str, Any]]
BELOW = "below target"  # a measured target missed: reported, not a failure (a slow machine is not a broken one)

# Dense bf16 TFLOP/s (no sparsity) from the vendors' datasheets, by a part of the CUDA device name;
# the first match wins, so more specific names come first.
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


@dataclass
class SpeedSpec:
    """Sizes of the speed rows on this device."""

    model: str | None  # a model option (vit_b32), or None: the correctness rows' model
    batch: int
    logical: int  # the gradient cache's logical batch, in chunks of ``batch``
    warmup: int
    steps: int
    large: tuple[int, int]  # --large: (logical batch, loss tile rows)

    @classmethod
    def for_device(cls, device: torch.device) -> SpeedSpec:
        if device.type == "cuda":
            return cls("vit_b32", 512, 32768, 3, 10, (262144, 4096))
        return cls(None, 16, 64, 2, 3, (256, 8))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per call after ``warmup`` calls (the first of which compiles)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops(device: torch.device) -> float:
    """FLOP/s of a square matmul (bf16 on CUDA, fp32 on CPU), the best of a few timed runs of 5."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = math.inf
    for _ in range(10 if device.type == "cuda" else 3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * size**3 / best


def datasheet_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for part, tflops in DATASHEET_BF16_TFLOPS if part in name), None)


def random_batch(trainer: Trainer, size: int, on_device: bool) -> dict[str, torch.Tensor]:
    """uint8 images as the loader gives them and random token ids; on the host (pinned on CUDA) for
    the gradient cache, which moves chunks itself. A host batch repeats one random block of 4,096
    (content does not matter here); a device batch is at most that block (the plain rows' batch)."""
    device = trainer.dist.device
    pixels, length = trainer.model.image_stats.size, trainer.model.text_tower.context_length
    generator = torch.Generator().manual_seed(0)
    block = min(size, 4096)
    image = torch.randint(0, 256, (block, 3, pixels, pixels), dtype=torch.uint8, generator=generator)
    text = torch.randint(1, 49000, (block, length), generator=generator)
    if on_device:
        return {"image": image.to(device), "text": text.to(device)}
    pin = device.type == "cuda"  # allocated pinned and filled in place: 262,144 ViT-B/32 images are 39 GB
    batch = {
        "image": torch.empty(size, 3, pixels, pixels, dtype=torch.uint8, pin_memory=pin),
        "text": torch.empty(size, length, dtype=torch.long, pin_memory=pin),
    }
    for start in range(0, size, block):
        stop = min(start + block, size)
        batch["image"][start:stop], batch["text"][start:stop] = image[: stop - start], text[: stop - start]
    return batch


class Measurements:
    """What the rows measured, shared with the rows that compare them."""

    def __init__(self, settings: CheckSettings, folder: Path, spec: SpeedSpec) -> None:
        self.settings, self.folder, self.spec = settings, folder, spec
        self.device = torch.device(settings.device)
        self.rates: dict[str, float] = {}
        self.flops_per_sample: float | None = None
        self.peak: float | None = None

    def trainer_overrides(self, batch: int | None = None, *extra: str, own_data: bool = False) -> list[str]:
        """``own_data``: the row picks its data option, and the user's ``data.*`` overrides (for the
        synthetic data of the other rows) are left out."""
        batch = batch or self.spec.batch
        user = [o for o in self.settings.overrides if not (own_data and o.lstrip("+~").startswith("data."))]
        settings = CheckSettings(self.settings.device, self.settings.precision, batch, user)
        model = [f"model={self.spec.model}"] if self.spec.model else []
        return settings.compose_overrides("clip", 10**6, *model, "trainer.compile_strict=true", *extra)

    def trainer(self, name: str, batch: int, *extra: str, own_data: bool = False) -> Trainer:
        overrides = self.trainer_overrides(batch, *extra, own_data=own_data)
        return build_check_trainer(overrides, self.folder / f"speed-{name}")

    def mfu(self, rate: float) -> str:
        if not self.flops_per_sample or not self.peak:
            return ""
        text = f", MFU {100 * rate * self.flops_per_sample / self.peak:.1f}% of the matmul"
        sheet = datasheet_flops(self.device)
        return text + (f", {100 * rate * self.flops_per_sample / sheet:.1f}% of the datasheet" if sheet else "")


def _rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def _memory(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, ""
    gib = torch.cuda.max_memory_allocated(device) / 2**30
    return gib, f", peak memory {gib:.1f} GiB"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_row(m: Measurements) -> RowResult:
    m.peak = matmul_flops(m.device)
    sheet = datasheet_flops(m.device)
    dtype = "bf16" if m.device.type == "cuda" else "fp32"
    detail = (
        f"{dtype} matmul {m.peak / 1e12:.1f} TFLOP/s" if m.peak > 1e12 else f"{dtype} matmul {m.peak / 1e9:.1f} GFLOP/s"
    )
    if m.device.type == "cuda":
        name = torch.cuda.get_device_name(m.device)
        detail += (
            f" = {100 * m.peak / sheet:.0f}% of the {name} datasheet's {sheet / 1e12:.0f}"
            if sheet
            else (f"; {name} is not in the datasheet table (MFU against the matmul only)")
        )
    return INFO, detail, {"tflops": m.peak / 1e12, "datasheet_tflops": sheet / 1e12 if sheet else None}


def vlhub_row(m: Measurements, name: str, compiled: bool, fused: bool) -> RowResult:
    _release(m.device)
    extra = (f"trainer.compile={str(compiled).lower()}", f"optim.fused={str(fused).lower()}")
    trainer = m.trainer(name, m.spec.batch, *extra)
    try:
        batch = random_batch(trainer, m.spec.batch, on_device=True)
        trainer.model.train()
        if m.flops_per_sample is None:  # model FLOPs of one eager forward + backward, per sample
            small = {k: v[: min(m.spec.batch, 64)] for k, v in batch.items()}
            with FlopCounterMode(display=False) as counter:
                PlainGradients()(trainer.model, trainer.objective, small, trainer.precision)
            trainer.optimizer.zero_grad(set_to_none=True)
            m.flops_per_sample = counter.get_total_flops() / len(small["image"])
        rate = m.spec.batch / timed(lambda: trainer.train_on_batch(batch), m.device, m.spec.steps, m.spec.warmup)
    finally:
        close(trainer)
    m.rates[name] = rate
    memory, memory_text = _memory(m.device)
    detail = f"{_rate(rate)} samples/s at batch {m.spec.batch}{m.mfu(rate)}{memory_text}"
    return INFO, detail, {"samples_per_s": rate, "batch": m.spec.batch, "peak_memory_gib": memory}


def open_clip_row(m: Measurements) -> RowResult:
    """open_clip's own model, ``ClipLoss`` and fused AdamW, ``torch.compile(model)`` as its
    ``--torchcompile`` does: the reference, same architecture, batch and precision as vlhub's rows."""
    import open_clip

    from vlhub.check.trainers import compose_train
    from vlhub.engine.precision import Precision

    _release(m.device)
    model_cfg = compose_train(m.trainer_overrides()).model
    torch.manual_seed(0)
    if model_cfg.get("arch"):
        model = open_clip.create_model(model_cfg.arch, device=m.device)
    else:
        model = open_clip.CLIP(**OmegaConf.to_container(model_cfg.config, resolve=True)).to(m.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if m.device.type == "cuda" else {}))
    forward, loss_fn = torch.compile(model), open_clip.ClipLoss()
    precision = Precision(m.settings.precision, m.device)
    pixels = model.visual.image_size
    pixels = pixels[0] if isinstance(pixels, tuple) else pixels
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(m.spec.batch, 3, pixels, pixels, generator=generator).to(m.device)
    texts = torch.randint(1, 49000, (m.spec.batch, model.context_length), generator=generator).to(m.device)

    def step() -> None:
        with precision.autocast():
            loss = loss_fn(*forward(images, texts))
        precision.scale(loss).backward()
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)

    rate = m.spec.batch / timed(step, m.device, m.spec.steps, m.spec.warmup)
    m.rates["open_clip"] = rate
    memory, memory_text = _memory(m.device)
    detail = f"{_rate(rate)} samples/s at batch {m.spec.batch}{m.mfu(rate)}{memory_text}"
    return INFO, detail, {"samples_per_s": rate, "batch": m.spec.batch, "peak_memory_gib": memory}


def ratio_row(m: Measurements, mine: str, reference: str, target: float, what: str) -> RowResult:
    if mine not in m.rates or reference not in m.rates:
        return UNTESTED, f"needs the rows {mine!r} and {reference!r}, which did not run", {}
    ratio = m.rates[mine] / m.rates[reference]
    values = {"ratio": ratio, "target": target}
    if m.device.type != "cuda":
        return INFO, f"{ratio:.2f}x {what} (CPU figure; the target {target:.2f}x is for GPUs)", values
    return (OK if ratio >= target else BELOW), f"{ratio:.2f}x {what} (target >= {target:.2f}x)", values


def grad_cache_row(m: Measurements, logical: int, tiles: int | None = None) -> RowResult:
    """The gradient cache at ``logical`` in chunks of the plain rows' batch, compile + fused, the batch
    on the host as the trainer keeps it; ``tiles``: the loss in tiles of that many rows (B x T memory)."""
    _release(m.device)
    chunk = m.spec.batch
    extra = ["trainer.compile=true", "optim.fused=true", "trainer.grad_cache.enabled=true"]
    extra += [f"trainer.grad_cache.chunk_size={chunk}", *([f"objective.loss_tiles={tiles}"] if tiles else [])]
    trainer = m.trainer(f"grad-cache-{logical}", logical, *extra)
    try:
        batch = random_batch(trainer, logical, on_device=False)
        trainer.model.train()
        steps = 1 if tiles else 2  # the tiled row is the large one: minutes per step on one GPU
        rate = logical / timed(lambda: trainer.train_on_batch(batch), m.device, steps, 1)
    finally:
        close(trainer)
    if tiles is None:
        m.rates["grad cache"] = rate
    memory, memory_text = _memory(m.device)
    tiled = f", loss in tiles of {tiles}" if tiles else ""
    detail = f"{_rate(rate)} samples/s at logical {logical:,} in chunks of {chunk}{tiled}{memory_text}"
    return INFO, detail, {"samples_per_s": rate, "logical": logical, "chunk": chunk, "peak_memory_gib": memory}


def speed_rows(m: Measurements, large: bool = False) -> list[tuple[str, str, Callable[[], RowResult]]]:
    """``large``: also the gradient cache at logical 262,144 (GPU; 256 on CPU) with a tiled loss."""
    plain = "vlhub compile + fused"
    rows = [
        ("speed", "matmul peak", lambda: peak_row(m)),
        ("speed", "vlhub eager", lambda: vlhub_row(m, "vlhub eager", compiled=False, fused=False)),
        ("speed", plain, lambda: vlhub_row(m, plain, compiled=True, fused=True)),
        ("speed", "open_clip compile + fused", lambda: open_clip_row(m)),
        ("speed", "vlhub vs open_clip", lambda: ratio_row(m, plain, "open_clip", 1.0, "open_clip's samples/s")),
        ("speed", f"grad cache {m.spec.logical:,}", lambda: grad_cache_row(m, m.spec.logical)),
        ("speed", "grad cache vs plain", lambda: ratio_row(m, "grad cache", plain, 0.75, "the plain step's samples/s")),
    ]
    if large:
        logical, tiles = m.spec.large
        rows.append(("speed", f"grad cache {logical:,}, tiled loss", lambda: grad_cache_row(m, logical, tiles)))
    return rows
