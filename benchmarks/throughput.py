"""Training throughput on one device: samples/s, peak memory and MFU, every row in one run.

Rows (same model, same random data, same precision):
  open_clip eager        open_clip's model + ``open_clip.ClipLoss`` + AdamW (torch's default kernels)
  open_clip compiled     the same, ``torch.compile(model)`` (open_clip's --torchcompile) + fused AdamW
  vlhub eager            ``vlhub.engine.train_step`` with plain gradients, AdamW with optim.fused=false
  vlhub compile+fused    trainer.compile=true, optim.fused=true
  + grad checkpointing   the same with model.grad_checkpointing=true
  grad cache L / C       the gradient cache at logical batch L in chunks of C (compile + fused; the batch
                         on the host, as the trainer keeps it), untiled and with ``objective.loss_tiles``

MFU = samples/s x FLOPs per sample / peak FLOP/s. FLOPs per sample: ``FlopCounterMode`` over one
forward + backward of the eager vlhub step (model FLOPs: checkpointing's and the gradient cache's
recompute are not counted). Peak FLOP/s: a square matmul timed in this run (bf16 on CUDA, fp32 on CPU).
Peak memory: ``torch.cuda.max_memory_allocated`` per row on CUDA; 'n/a' on CPU (one process: the
peak RSS only grows). A row that runs out of memory prints as such and the run goes on.

    python benchmarks/throughput.py --device cuda                    # ViT-B-32, bf16 autocast, batch 512
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --smoke        # every row on CPU at tiny sizes
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from dataclasses import dataclass

import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlhub.check.speed import matmul_flops, timed  # the measuring code python -m vlhub.check uses
from vlhub.engine.compile import compile_towers
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients, train_step
from vlhub.models import build_open_clip_model
from vlhub.objectives import ClipObjective
from vlhub.optim import OptimRecipe

TINY = {  # --smoke: configs/model/tiny.yaml's model with one layer per tower (compiling is the cost on CPU)
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 96, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@dataclass
class Setup:
    device: torch.device
    precision: Precision
    arch: str | None  # None: the TINY config
    batch: int
    warmup: int
    steps: int
    cache_steps: int

    def model_kwargs(self) -> dict:
        return {"arch": self.arch} if self.arch else {"config": TINY}


def random_batch(model, size: int, device: torch.device, on_host: bool) -> dict[str, torch.Tensor]:
    """Images as the loader gives them (uint8) on the host for the gradient cache, else normalised
    floats on the device; random token ids. A host batch repeats one random block of up to 4,096
    samples (content does not matter here; at 262,144 ViT-B/32 images it is 39 GB, pinned on CUDA)."""
    generator = torch.Generator().manual_seed(0)
    pixels, length = model.image_stats.size, model.text_tower.context_length
    if not on_host:
        image = torch.randn(size, 3, pixels, pixels, generator=generator)
        text = torch.randint(1, 49000, (size, length), generator=generator)
        return {"image": image.to(device), "text": text.to(device)}
    pin = device.type == "cuda"
    batch = {
        "image": torch.empty(size, 3, pixels, pixels, dtype=torch.uint8, pin_memory=pin),
        "text": torch.empty(size, length, dtype=torch.long, pin_memory=pin),
    }
    block = min(size, 4096)
    image = torch.randint(0, 256, (block, 3, pixels, pixels), dtype=torch.uint8, generator=generator)
    text = torch.randint(1, 49000, (block, length), generator=generator)
    for start in range(0, size, block):
        stop = min(start + block, size)
        batch["image"][start:stop] = image[: stop - start]
        batch["text"][start:stop] = text[: stop - start]
    return batch


# -- rows ----------------------------------------------------------------------------------------


def open_clip_row(setup: Setup, compiled: bool) -> float:
    torch.manual_seed(0)
    if setup.arch:
        model = open_clip.create_model(setup.arch, device=setup.device)
    else:
        model = open_clip.CLIP(**TINY).to(setup.device)
    model.train()
    kernel = {"fused": True} if compiled and setup.device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kernel)
    forward = torch.compile(model) if compiled else model  # as open_clip_train's --torchcompile
    loss_fn = open_clip.ClipLoss()
    pixels = model.visual.image_size
    pixels = pixels[0] if isinstance(pixels, tuple) else pixels
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(setup.batch, 3, pixels, pixels, generator=generator).to(setup.device)
    texts = torch.randint(1, 49000, (setup.batch, model.context_length), generator=generator).to(setup.device)

    def step() -> None:
        with setup.precision.autocast():
            image_features, text_features, logit_scale = forward(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return setup.batch / timed(step, setup.device, setup.steps, setup.warmup)


def vlhub_row(
    setup: Setup,
    compiled: bool,
    fused: bool,
    checkpointing: bool = False,
    logical: int | None = None,
    chunk: int | None = None,
    loss_tiles: int | None = None,
) -> float:
    torch.manual_seed(0)
    model = build_open_clip_model(**setup.model_kwargs(), grad_checkpointing=checkpointing).to(setup.device)
    objective = ClipObjective(loss_tiles=loss_tiles) if loss_tiles else ClipObjective()
    optimizer, scheduler = OptimRecipe(
        torch.optim.AdamW, lr=1e-4, weight_decay=0.1, scheduler="constant", warmup_steps=0, fused=fused
    ).build([model, objective], 10**6)
    if compiled:
        compile_towers(model)
    model.train()
    size = logical or setup.batch
    batch = random_batch(model, size, setup.device, on_host=logical is not None)
    strategy = GradCache(chunk) if logical else PlainGradients()

    def step() -> None:
        train_step(model, objective, batch, optimizer, scheduler, setup.precision, strategy, None)

    steps, warmup = (setup.cache_steps, 1) if logical else (setup.steps, setup.warmup)
    return size / timed(step, setup.device, steps, warmup)


def flops_per_sample(setup: Setup) -> float:
    """FLOPs of one forward + backward of the vlhub step, per sample."""
    torch.manual_seed(0)
    model = build_open_clip_model(**setup.model_kwargs()).to(setup.device)
    objective, size = ClipObjective(), min(setup.batch, 64)
    batch = random_batch(model, size, setup.device, on_host=False)
    with FlopCounterMode(display=False) as counter:
        PlainGradients()(model, objective, batch, setup.precision)
    return counter.get_total_flops() / size


def measure(run: Callable[[], float], device: torch.device) -> tuple[str, float | None, float | None]:
    """(status, samples/s, peak memory in GiB or None) of one row; out of memory is a status."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    status, rate = "ok", None
    try:
        rate = run()
    except torch.OutOfMemoryError:
        status = "out of memory"
    gc.collect()  # the failed row's tensors, now that its frames are gone
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return status, rate, memory


def rows(setup: Setup, logicals: list[int], chunk: int, loss_tiles: int) -> list[tuple[str, Callable[[], float] | str]]:
    tiled = getattr(ClipObjective, "supports_loss_tiles", False)  # objective.loss_tiles (vlhub/objectives/tiled.py)
    table: list[tuple[str, Callable[[], float] | str]] = [
        ("open_clip eager + ClipLoss + AdamW", lambda: open_clip_row(setup, compiled=False)),
        ("open_clip torch.compile + fused AdamW", lambda: open_clip_row(setup, compiled=True)),
        ("vlhub train_step, eager", lambda: vlhub_row(setup, compiled=False, fused=False)),
        ("vlhub compile + fused", lambda: vlhub_row(setup, compiled=True, fused=True)),
        ("vlhub compile + fused + grad checkpointing", lambda: vlhub_row(setup, True, True, checkpointing=True)),
    ]
    for logical in logicals:
        name = f"grad cache {logical:,} / {chunk}, compile + fused"
        table.append((name, lambda logical=logical: vlhub_row(setup, True, True, logical=logical, chunk=chunk)))
        name_tiled = f"{name}, loss_tiles={loss_tiles}"
        if tiled:
            run = lambda logical=logical: vlhub_row(  # noqa: E731
                setup, True, True, logical=logical, chunk=chunk, loss_tiles=loss_tiles
            )
            table.append((name_tiled, run))
        else:
            table.append((name_tiled, "needs loss_tiles"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="ViT-B-32", help="an open_clip architecture")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--logical", type=int, nargs="+", default=[32768, 65536, 262144])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--loss-tiles", type=int, default=4096, help="rows per tile of the tiled loss")
    parser.add_argument("--precision", default=None, help="default: amp_bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cache-steps", type=int, default=2, help="timed steps of the gradient-cache rows")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--smoke", action="store_true", help="every row on CPU, tiny model and sizes")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.arch, args.batch, args.logical, args.chunk = "cpu", None, 16, [64, 128, 256], 16
        args.loss_tiles, args.warmup, args.steps, args.cache_steps = 8, 2, 5, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = Precision(args.precision or ("amp_bf16" if device.type == "cuda" else "fp32"), device)
    setup = Setup(device, precision, args.arch, args.batch, args.warmup, args.steps, args.cache_steps)

    peak = matmul_flops(device)
    flops = flops_per_sample(setup)
    print(
        f"device={device} model={args.arch or 'tiny'} precision={precision.name} batch={args.batch} "
        f"FLOPs/sample={flops / 1e9:.3g} G, matmul peak={peak / 1e12:.3g} TFLOP/s"
    )
    print("| row | batch | samples/s | peak memory (GiB) | MFU | vs vlhub eager |")
    print("|---|---|---|---|---|---|")
    reference = None
    for name, run in rows(setup, args.logical, args.chunk, args.loss_tiles):
        if isinstance(run, str):
            print(f"| {name} | | {run} | | | |", flush=True)
            continue
        status, rate, memory = measure(run, device)
        if name.startswith("vlhub train_step"):
            reference = rate
        batch = name.split(" ")[2].replace(",", "") if name.startswith("grad cache") else str(args.batch)
        if status != "ok":
            print(f"| {name} | {batch} | {status} | | | |", flush=True)
            continue
        memory_text = f"{memory:.1f}" if memory is not None else "n/a"
        ratio = f"{rate / reference:.2f}x" if reference else ""
        print(
            f"| {name} | {batch} | {rate:,.0f} | {memory_text} | {100 * rate * flops / peak:.1f}% | {ratio} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
