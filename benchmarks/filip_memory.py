"""FILIP's token-wise loss: peak memory of forward + backward, blocked (vlhub) vs all pairs at once.

The reference materialises the [B, B, N, L] token similarity in one einsum (what x_clip does);
vlhub computes [block, block, N, L] at a time under activation checkpointing. Each run is its
own subprocess, so peak memory is its own; the two are measured in the same run, on the same
random tokens, and their losses are checked equal.

    OMP_NUM_THREADS=1 python benchmarks/filip_memory.py --batches 64 128 256
    python benchmarks/filip_memory.py --device cuda --batches 256 512 1024 2048 --dim 512 --text-len 77

CPU memory is the growth of peak RSS over the RSS after the inputs are built; CUDA memory is
``torch.cuda.max_memory_allocated`` above the inputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _all_pairs(image, text, mask):
    """The reference: every pair's token similarities at once, [B, B, N, L]."""
    import torch

    sim = torch.einsum("and,bld->abnl", image, text)
    image_to_text = sim.masked_fill(~mask[None, :, None, :], float("-inf")).amax(dim=3).mean(dim=2)
    best = sim.amax(dim=2)
    m = mask[None].float()
    return image_to_text, (best * m).sum(dim=2) / m.sum(dim=2)


def _measure(args: argparse.Namespace, batch: int, blocked: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from vlhub.objectives.filip import token_similarity

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    image = F.normalize(torch.randn(batch, args.patches, args.dim, device=device), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, args.text_len, args.dim, device=device), dim=-1).requires_grad_()
    mask = torch.arange(args.text_len, device=device)[None] < torch.randint(3, args.text_len, (batch, 1), device=device)
    base = (
        torch.cuda.memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    i2t, t2i = token_similarity(image, text, mask, args.block) if blocked else _all_pairs(image, text, mask)
    labels = torch.arange(batch, device=device)
    loss = F.cross_entropy(10 * i2t, labels) + F.cross_entropy(10 * t2i.T, labels)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    return {"loss": loss.item(), "peak_mb": peak / 2**20, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--patches", type=int, default=49)  # ViT-B/32 at 224 px
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(args, args.worker[0], bool(args.worker[1]))))
        return
    passthrough = sys.argv[1:]
    print(f"{'batch':>6} {'all pairs MB':>13} {'blocked MB':>11} {'ratio':>7} {'loss equal':>10}")
    for batch in args.batches:
        runs = []
        for blocked in (0, 1):
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--worker", str(batch), str(blocked)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        reference, ours = runs
        equal = abs(reference["loss"] - ours["loss"]) <= 1e-4 * abs(reference["loss"])
        ratio = reference["peak_mb"] / max(ours["peak_mb"], 1e-9)
        print(f"{batch:>6} {reference['peak_mb']:>13.1f} {ours['peak_mb']:>11.1f} {ratio:>6.1f}x {str(equal):>10}")


if __name__ == "__main__":
    main()
