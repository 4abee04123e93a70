"""Host-to-device cost of one training batch, and whether the prefetcher hides it (needs CUDA).

    python benchmarks/input_copy.py --batch-size 256 --size 224 --step-ms 60

Prints milliseconds per batch for: fp32 from pageable memory (the old path), fp32 pinned,
uint8 pinned + normalisation on the device (vlhub's path); then the wall time of a run of
fake steps (a matmul loop lasting about ``--step-ms``) fed by uint8 pinned batches, with and
without ``vlhub.engine.prefetch`` (with it, the copy should vanish behind the step).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vlhub.data.batch import move_batch
from vlhub.engine.prefetch import prefetch

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--step-ms", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("input_copy.py measures host-to-device copies: it needs a CUDA device")
    device = torch.device("cuda")
    shape = (args.batch_size, 3, args.size, args.size)
    uint8 = torch.randint(0, 256, shape, dtype=torch.uint8)
    fp32 = uint8.float().div(255)
    pinned_fp32, pinned_uint8 = fp32.pin_memory(), uint8.pin_memory()
    rows = {
        "fp32_pageable_ms": timed(lambda: fp32.to(device), 20),
        "fp32_pinned_ms": timed(lambda: pinned_fp32.to(device, non_blocking=True), 20),
        "uint8_pinned_normalised_ms": timed(
            lambda: move_batch({"image": pinned_uint8}, device, torch.bfloat16, MEAN, STD), 20
        ),
    }
    weight = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    per_matmul = timed(lambda: weight @ weight, 20)
    matmuls = max(1, round(args.step_ms / per_matmul))
    batches = [{"image": torch.randint(0, 256, shape, dtype=torch.uint8).pin_memory()} for _ in range(4)]

    def run(stream_of_batches) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in stream_of_batches:
            images = move_batch(batch, device, torch.bfloat16, MEAN, STD)["image"]
            out = weight
            for _ in range(matmuls):
                out = out @ weight
            images.sum()  # the step reads its batch
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps * 1e3

    sequence = [batches[k % len(batches)] for k in range(args.steps)]
    rows["step_ms_without_prefetch"] = run(sequence)
    rows["step_ms_with_prefetch"] = run(prefetch(sequence, device))
    rows["step_ms_compute_only"] = timed(lambda: [weight @ weight for _ in range(matmuls)], 5)
    print(json.dumps({k: round(v, 3) for k, v in rows.items()} | {"device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
