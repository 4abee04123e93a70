"""Time vlhub's chunked retrieval recall at COCO 5k scale: 25,000 captions x 5,000 images, D=512, CPU.

    OMP_NUM_THREADS=1 python benchmarks/retrieval_recall.py [--threads 1] [--chunk-size 1024]

Random L2-normalised embeddings; each image owns 5 consecutive captions. Reports the wall time
of ``retrieval_recall`` (both directions, k = 1, 5, 10) and the peak size of one score chunk,
against the 25,000 x 5,000 fp32 matrix (500 MB) that is never built.
"""

from __future__ import annotations

import argparse
import time

import torch

from vlhub.eval.retrieval import retrieval_recall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(args.images, args.dim, generator=generator), dim=-1)
    owners = torch.arange(args.images).repeat_interleave(args.per_image)
    texts = torch.nn.functional.normalize(torch.randn(len(owners), args.dim, generator=generator), dim=-1)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics = retrieval_recall(texts, images, owners, chunk_size=args.chunk_size)
        times.append(time.perf_counter() - start)
    chunk_mb = args.chunk_size * max(len(texts), args.images) * 4 / 2**20
    full_mb = len(texts) * args.images * 4 / 2**20
    print(
        f"{len(texts)} captions x {args.images} images, D={args.dim}, threads={torch.get_num_threads()}, "
        f"chunk_size={args.chunk_size}"
    )
    print(
        f"retrieval_recall: best {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s "
        f"over {args.repeats} runs"
    )
    print(f"largest score chunk {chunk_mb:.0f} MB (the full matrix would be {full_mb:.0f} MB)")
    print({k: round(v, 5) for k, v in metrics.items()})


if __name__ == "__main__":
    main()
