"""DDP (all-reduce overlapped with the backward) against the manual all-reduce after the backward.

1. Measured, 2 gloo ranks on CPU, in one run: the median step time of
     none    each rank steps on its own gradients (no averaging): the compute alone
     manual  trainer.strategy=manual: every gradient all-reduced after the backward
     ddp     trainer.strategy=ddp: each tower in DistributedDataParallel, buckets reduced during the backward
   taken in turns (one step of each, repeated), each step started together on both ranks, plus the
   all-reduce of every gradient alone. Shares: communication = (manual - none) / manual; hidden
   by ddp = (manual - ddp) / (manual - none).
2. DDP's buckets for ViT-B/32 and ViT-L/14 (meta tensors: no weights are made), per tower, from
   DDP's own assignment function with its default caps (1 MiB first bucket, then 25 MiB), the
   parameters in reverse definition order (about the backward's order, which DDP buckets by from
   its second step on).
3. On paper, from those buckets: the communication share of a step on 8, 64 and 512 GPUs, without
   overlap and with it (see ``paper_table`` for the assumptions).

    OMP_NUM_THREADS=1 python benchmarks/ddp_overlap.py                  # tiny, batch 16 per rank
    OMP_NUM_THREADS=1 python benchmarks/ddp_overlap.py --model tiny --batch 8 --steps 12
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

MODES = ("none", "manual", "ddp")
MiB = 2**20

# Paper-table assumptions (issue 9's H100 measurement and common hardware figures).
B32_SAMPLES_PER_S, B32_BATCH = 3830.0, 512  # ViT-B/32 bf16 (amp), batch 512 per GPU, one H100
L14_SLOWDOWN = 14.0  # ViT-L/14 throughput ~ 1/14 of ViT-B/32's
BACKWARD_SHARE = 2 / 3  # backward ~ 2x the forward's FLOPs
NODE_BYTES_PER_S = 400e9 / 8  # 400 Gb/s per node
GPUS = (8, 64, 512)


def _build(model_name: str, dist_info, seed: int):
    """One model and optimizer for the three modes (so a ViT-B/32 fits twice in memory); the DDP
    wrappers are made once and switched on for the ddp steps only."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from vlhub.objectives import ClipObjective
    from vlhub.optim import OptimRecipe
    from vlhub.parallel.ddp import TowerDDP
    from vlhub.parallel.manual import ManualAllReduce
    from vlhub.parallel.strategy import ParallelStrategy

    torch.manual_seed(seed)
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        model = instantiate(compose(config_name="train", overrides=[f"model={model_name}"]).model)
    objective = ClipObjective()
    strategies = {"none": ParallelStrategy(dist_info), "manual": ManualAllReduce(dist_info), "ddp": TowerDDP(dist_info)}
    strategies["ddp"].setup(model, objective)
    optimizer, scheduler = OptimRecipe(
        torch.optim.AdamW, lr=1e-6, weight_decay=0.0, scheduler="constant", warmup_steps=0
    ).build([model, objective], 10**6)
    return model, objective, strategies, optimizer, scheduler


def _rank_main(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from vlhub.engine.precision import Precision
    from vlhub.engine.step import PlainGradients, train_step
    from vlhub.parallel import collectives
    from vlhub.parallel.environment import DistInfo

    dist_info = DistInfo(rank, 2, rank, torch.device("cpu"))
    model, objective, strategies, optimizer, scheduler = _build(args.model, dist_info, args.seed)
    calls = dict(model.tower_calls)
    size, context = model.image_stats.size, model.text_tower.context_length
    generator = torch.Generator().manual_seed(rank)
    batch = {
        "image": torch.randn(args.batch, 3, size, size, generator=generator),
        "text": torch.randint(1, 49000, (args.batch, context), generator=generator),
    }
    precision, gradients = Precision("fp32", torch.device("cpu")), PlainGradients()
    params = [p for p in model.parameters() if p.requires_grad]
    times: dict[str, list[float]] = {mode: [] for mode in [*MODES, "all-reduce alone"]}
    for step in range(args.warmup + args.steps):
        for mode in MODES:
            model.tower_calls = calls if mode == "ddp" else {}  # the towers bare, or through DDP
            torch.distributed.barrier()
            start = time.perf_counter()
            train_step(model, objective, batch, optimizer, scheduler, precision, gradients, None, strategies[mode])
            if step >= args.warmup:
                times[mode].append(time.perf_counter() - start)
        for param in params:
            param.grad = torch.randn_like(param)
        torch.distributed.barrier()
        start = time.perf_counter()
        collectives.all_reduce_grads_(params)
        if step >= args.warmup:
            times["all-reduce alone"].append(time.perf_counter() - start)
        for param in params:
            param.grad = None
    medians = torch.tensor([statistics.median(times[m]) for m in times])
    torch.distributed.all_reduce(medians, op=torch.distributed.ReduceOp.MAX)  # the slower rank sets the pace
    if rank == 0:
        grad_mb = sum(p.numel() for p in params) * 4 / MiB
        torch.save({"medians": dict(zip(times, medians.tolist(), strict=True)), "grad_mb": grad_mb}, out)
    torch.distributed.destroy_process_group()


def measured(args: argparse.Namespace) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.pt")
        mp.spawn(_rank_main, args=(port, args, out), nprocs=2, join=True)
        result = torch.load(out)
    t = result["medians"]
    print(
        f"## Measured: model={args.model}, batch {args.batch} per rank, 2 gloo ranks on CPU, "
        f"{args.threads} thread each, {result['grad_mb']:.1f} MiB of fp32 gradients; median of {args.steps} steps"
    )
    print("| strategy | step (s) | vs manual |")
    print("|---|---|---|")
    for mode in [*MODES, "all-reduce alone"]:
        print(f"| {mode} | {t[mode]:.3f} | {t[mode] / t['manual']:.2f} |")
    comm = t["manual"] - t["none"]
    alone = t["all-reduce alone"] / t["manual"]
    print(f"communication share of a manual step: {comm / t['manual']:.0%} (the all-reduce alone: {alone:.0%})")
    print(f"part of it ddp hides: {(t['manual'] - t['ddp']) / comm:.0%}" if comm > 0 else "no communication measured")


def bucket_sizes() -> dict[str, dict[str, list[int]]]:
    """Model -> tower -> DDP bucket sizes in bytes (fp32 gradients), in reduction order."""
    import torch.distributed as dist
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        configs = {m: compose(config_name="train", overrides=[f"model={m}"]).model for m in ("vit_b32", "vit_l14")}
    sizes = {}
    for name, config in configs.items():
        with torch.device("meta"):
            model = instantiate(config)
        sizes[name] = {}
        for tower in ("image_tower", "text_tower"):
            params = [p for p in getattr(model, tower).parameters() if p.requires_grad][::-1]
            limits = [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * MiB]
            buckets, _ = dist._compute_bucket_assignment_by_size(params, limits, [False] * len(params))
            sizes[name][tower] = [sum(params[i].numel() * 4 for i in bucket) for bucket in buckets]
    return sizes


def exposed_seconds(buckets: list[int], backward_s: float, gpus: int) -> float:
    """Communication left after the backward, buckets reduced one at a time as they become ready.

    Gradients become ready at a constant rate (bytes per second of backward) in bucket order; a
    bucket's all-reduce starts when it is ready and the previous one is done, and takes the ring
    all-reduce time of its bytes.
    """
    total, ready, done = sum(buckets), 0.0, 0.0
    for size in buckets:
        ready += size / total * backward_s
        done = max(done, ready) + 2 * (gpus - 1) / gpus * size / NODE_BYTES_PER_S
    return max(0.0, done - backward_s)


def paper_table(sizes: dict[str, dict[str, list[int]]]) -> None:
    b32_step = B32_BATCH / B32_SAMPLES_PER_S
    steps = {"vit_b32": b32_step, "vit_l14": b32_step * L14_SLOWDOWN}
    print("\n## DDP buckets (fp32 gradients, default caps; MiB, in reduction order)")
    for name, towers in sizes.items():
        for tower, buckets in towers.items():
            shown = ", ".join(f"{b / MiB:.1f}" for b in buckets)
            print(f"{name} {tower}: {len(buckets)} buckets, {sum(buckets) / MiB:.0f} MiB: {shown}")
    print(
        f"\n## On paper: communication share of a step at {NODE_BYTES_PER_S * 8 / 1e9:.0f} Gb/s per node "
        f"(ring all-reduce 2(N-1)/N x bytes / bandwidth)\n"
        f"compute per step (batch {B32_BATCH} per GPU, bf16): ViT-B/32 {b32_step * 1e3:.0f} ms "
        f"({B32_SAMPLES_PER_S:.0f} samples/s on one H100, issue 9), ViT-L/14 {L14_SLOWDOWN:.0f}x that; "
        f"backward {BACKWARD_SHARE:.0%} of it"
    )
    print("| model | GPUs | grads (MB) | all-reduce (ms) | share, no overlap | exposed (ms) | share, overlap |")
    print("|---|---|---|---|---|---|---|")
    for name, towers in sizes.items():
        buckets = towers["image_tower"] + towers["text_tower"]  # image tower's backward first, then text's
        step, total = steps[name], sum(buckets)
        for gpus in GPUS:
            comm = 2 * (gpus - 1) / gpus * total / NODE_BYTES_PER_S
            exposed = exposed_seconds(buckets, step * BACKWARD_SHARE, gpus)
            print(
                f"| {name} | {gpus} | {total / 1e6:.0f} | {comm * 1e3:.1f} | {comm / (step + comm):.1%} "
                f"| {exposed * 1e3:.1f} | {exposed / (step + exposed):.1%} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paper-only", action="store_true", help="skip the measured part")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.paper_only:
        measured(args)
    paper_table(bucket_sizes())


if __name__ == "__main__":
    main()
