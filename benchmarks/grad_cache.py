"""Gradient cache vs plain steps: time per optimizer step and peak memory, in one run.

Each configuration runs in its own subprocess (so peak memory is its own), on the same model
and the same random batch:
  plain@B      one forward/backward at the logical batch B (the reference)
  plain@C      one forward/backward at the chunk size C (what fits without caching)
  cache@B/C    the gradient cache at logical batch B in chunks of C

    OMP_NUM_THREADS=1 python benchmarks/grad_cache.py --batch 512 --chunks 32 128
    python benchmarks/grad_cache.py --model vit_b32 --device cuda --precision amp_bf16 --batch 4096 --chunks 256

CPU memory is the growth of peak RSS over the RSS before the first step; CUDA memory is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _measure(args: argparse.Namespace, batch: int, chunk: int | None) -> dict:
    import torch
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from vlhub.engine.grad_cache import GradCache
    from vlhub.engine.precision import Precision
    from vlhub.engine.step import PlainGradients, train_step
    from vlhub.objectives import ClipObjective
    from vlhub.optim import OptimRecipe

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        model = instantiate(compose(config_name="train", overrides=[f"model={args.model}"]).model).to(device)
    objective = ClipObjective()
    size = model.image_stats.size
    generator = torch.Generator().manual_seed(0)
    data = {
        "image": torch.randn(batch, 3, size, size, generator=generator).to(device),
        "text": torch.randint(1, 49000, (batch, model.text_tower.context_length), generator=generator).to(device),
    }
    optimizer, scheduler = OptimRecipe(
        torch.optim.AdamW, lr=1e-4, weight_decay=0.0, scheduler="constant", warmup_steps=0
    ).build([model], 10**6)
    precision = Precision(args.precision, device)
    strategy = GradCache(chunk) if chunk else PlainGradients()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        train_step(model, objective, data, optimizer, scheduler, precision, strategy, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        memory_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    step = statistics.median(times[args.warmup :])
    return {"step_s": step, "samples_per_s": batch / step, "memory_mb": memory_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "batch,chunk" to measure in this process
    args = parser.parse_args()
    if args.one:
        batch, chunk = (int(v) for v in args.one.split(","))
        print(json.dumps(_measure(args, batch, chunk or None)))
        return

    def run(batch: int, chunk: int) -> dict:
        command = [sys.executable, __file__, *sys.argv[1:], "--one", f"{batch},{chunk}"]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    reference = run(args.batch, 0)
    rows = [(f"plain@{args.batch}", reference)]
    for chunk in args.chunks:
        rows.append((f"plain@{chunk}", run(chunk, 0)))
        rows.append((f"cache@{args.batch}/{chunk}", run(args.batch, chunk)))
    print(f"model={args.model} device={args.device} precision={args.precision} threads={args.threads}")
    print("| config | step (s) | samples/s | time vs plain@B | peak memory (MB) | memory vs plain@B |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['step_s']:.3f} | {r['samples_per_s']:.0f} | {r['step_s'] / reference['step_s']:.2f} "
            f"| {r['memory_mb']:.0f} | {r['memory_mb'] / max(reference['memory_mb'], 1e-9):.2f} |"
        )


if __name__ == "__main__":
    main()
