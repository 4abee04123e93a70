"""The input rows: images/s of the training data pipeline with all cores, the host-to-device copy of
a batch, and which of the loader and the device is the ceiling.

The loader is the trainer's own (``data=wds``: shard stream, decode, augment, tokenise, batch in
``DataLoader`` workers), reading a few shards of generated shapes written at the model's image
size, or the user's shards (``--data PATH``). Generated 224 px JPEGs decode faster than photos:
time real shards with ``--data`` to know the real ceiling.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hydra.utils import instantiate

from vlhub.check.rows import INFO, UNTESTED
from vlhub.check.speed import Measurements, synchronize
from vlhub.check.trainers import close, compose_train
from vlhub.data import SyntheticShapes
from vlhub.data.write_shards import write_shards
from vlhub.engine.step import device_batch

RowResult = tuple[str, str, dict[str, Any]]
SAMPLES_PER_SHARD = 32


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class InputCheck:
    def __init__(self, m: Measurements, data: str | None) -> None:
        self.m, self.data = m, data
        self.workers = cores()
        self.rate: float | None = None
        self.copy: float | None = None

    def _shards(self) -> str:
        """The user's shard spec, or shards of generated shapes at the model's image size, two per worker."""
        if self.data:
            return self.data
        pixels = instantiate(compose_train(self.m.trainer_overrides()).model).image_stats.size
        count = 2 * self.workers
        shapes = SyntheticShapes(num_samples=count * SAMPLES_PER_SHARD, image_size=pixels)
        folder = self.m.folder / "shards"
        write_shards((shapes.load(i) for i in range(count * SAMPLES_PER_SHARD)), folder, SAMPLES_PER_SHARD)
        return f"{folder}/shard-{{000000..{count - 1:06d}}}.tar"

    def loader_row(self) -> RowResult:
        root = self._shards()
        extra = ("data=wds", f'data.root="{root}"', f"data.workers={self.workers}")
        # The user's data.* overrides describe the synthetic data of the other rows, or with --data their shards.
        trainer = self.m.trainer("input", self.m.spec.batch, *extra, own_data=not self.data)
        try:
            loader = iter(trainer.make_loader(0))
            # Each worker makes whole batches, all starting together: the first round (one batch per
            # worker) arrives at once and is not timed; the next three rounds are the steady rate.
            for _ in range(self.workers):
                first = next(loader).batch
            batches, images = 3 * self.workers, 0
            start = time.perf_counter()
            for _ in range(batches):
                images += len(next(loader).batch["image"])
            self.rate = images / (time.perf_counter() - start)
            self.copy = self._copy_ms(trainer, first)
        finally:
            close(trainer)
        source = "your shards" if self.data else "generated shards"
        detail = f"{self.rate:,.0f} images/s with {self.workers} workers ({source}, batch {self.m.spec.batch})"
        return INFO, detail, {"images_per_s": self.rate, "workers": self.workers, "root": root}

    def _copy_ms(self, trainer: Any, batch: dict[str, Any]) -> float | None:
        if trainer.dist.device.type != "cuda":
            return None
        device = trainer.dist.device

        def copy() -> None:
            device_batch(batch, trainer.model, trainer.precision)

        copy()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            copy()
        synchronize(device)
        return (time.perf_counter() - start) / 10 * 1e3

    def copy_row(self) -> RowResult:
        if self.m.device.type != "cuda":
            return UNTESTED, "no GPU: nothing is copied", {}
        if self.copy is None:
            return UNTESTED, "needs the loader row, which did not run", {}
        return (
            INFO,
            f"{self.copy:.1f} ms per batch of {self.m.spec.batch} (pinned uint8, normalised on the GPU)",
            {"ms": self.copy},
        )

    def ceiling_row(self) -> RowResult:
        step = self.m.rates.get("vlhub compile + fused")
        if self.rate is None or step is None:
            return UNTESTED, "needs the loader and 'vlhub compile + fused' rows, which did not run", {}
        ceiling = "the loader" if self.rate < step else "the device"
        cpu = " (CPU figures)" if self.m.device.type != "cuda" else ""
        detail = f"{ceiling}: loader {self.rate:,.0f} images/s vs step {step:,.0f} samples/s{cpu}"
        return INFO, detail, {"ceiling": ceiling, "loader": self.rate, "step": step}


def input_rows(m: Measurements, data: str | None) -> list[tuple[str, str, Any]]:
    check = InputCheck(m, data)
    return [
        ("input", "loader images/s", check.loader_row),
        ("input", "host-to-device copy", check.copy_row),
        ("input", "loader or device the ceiling", check.ceiling_row),
    ]
