"""Peak memory of the contrastive loss alone (forward + backward), untiled vs ``objective.loss_tiles``.

Both sides are vlhub's objectives, built the way a config builds them (``ClipObjective()`` vs
``ClipObjective(loss_tiles=R)``, the same for ``SiglipObjective``), run on the same random
normalised [B, D] features with a learnable temperature (and SigLIP's bias). Each row prints
both peaks, their ratio, and the tiled loss's agreement with the untiled one: the relative
difference of the loss and the largest relative difference of each gradient (image and text
features, logit scale, bias), so the memory saving is shown on an exact loss.

How memory is measured (the peak of live tensor allocations above what existed before the step):
- CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of the
  CPU allocator as a ``[memory]`` event carrying its signed size; the peak is the maximum of the
  running sum of those sizes over the step, in event order. This counts tensor memory (including
  each op's temporaries), not the process's RSS, which the allocator and the OS round and keep.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the step (the caching allocator's count of live tensor bytes).
The inputs' gradients (2 B D floats) are allocated inside the step on both sides and counted.

    OMP_NUM_THREADS=1 python benchmarks/tiled_loss_memory.py                 # B = 4096, 16384; D = 512; R = 256
    python benchmarks/tiled_loss_memory.py --device cuda --batches 4096 16384 65536

Memory of the untiled loss grows as B^2 (logits, their softmax and gradient); the tiled loss's as
B (D + R): the last lines print each side's growth from the first batch size to the others.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from vlhub.objectives import ClipObjective, SiglipObjective


class Temperature(nn.Module):
    """What the objectives read from a model: the temperature (CLIP's start) and a bias (SigLIP's)."""

    max_logit_scale = 100.0

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def temperature_scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)


def _cpu_peak(step) -> tuple[int, object]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
    )
    live = peak = 0
    for event in memory:
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak, result


def _cuda_peak(step, device: torch.device) -> tuple[int, object]:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, result


def _run(objective: nn.Module, reps: dict, model: Temperature, device: torch.device) -> tuple[int, float, dict]:
    leaves = {"image": reps["image_features"], "text": reps["text_features"], **dict(model.named_parameters())}

    for leaf in leaves.values():  # before measuring: freeing the last run's gradients would offset the count
        leaf.grad = None

    def step() -> float:
        loss = objective.loss(reps, model)["loss"]
        loss.backward()
        return loss.item()

    peak, loss = _cuda_peak(step, device) if device.type == "cuda" else _cpu_peak(step)
    grads = {name: leaf.grad.detach().clone() for name, leaf in leaves.items() if leaf.grad is not None}
    return peak, loss, grads


def _largest_relative_difference(grads: dict, reference: dict) -> dict[str, float]:
    return {
        name: ((grads[name] - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
        for name, ref in reference.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=256, help="rows per tile (objective.loss_tiles)")
    parser.add_argument("--forms", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    builders = {"clip": ClipObjective, "siglip": SiglipObjective}
    print(f"device {device}, D = {args.dim}, R = {args.tile} rows per tile; MiB = 2^20 bytes")
    print(
        f"{'loss':>6} {'B':>6} {'untiled MiB':>12} {'tiled MiB':>10} {'tiled/untiled':>13} "
        f"{'loss rel diff':>13}  largest gradient rel diff"
    )
    peaks: dict[tuple[str, int], tuple[int, int]] = {}
    for form in args.forms:
        for batch in args.batches:
            generator = torch.Generator(device=device).manual_seed(batch)
            reps = {
                key: F.normalize(torch.randn(batch, args.dim, device=device, generator=generator), dim=-1)
                for key in ("image_features", "text_features")
            }
            reps = {key: value.requires_grad_() for key, value in reps.items()}
            model = Temperature().to(device)
            untiled_peak, untiled_loss, untiled_grads = _run(builders[form](), reps, model, device)
            tiled_peak, tiled_loss, tiled_grads = _run(builders[form](loss_tiles=args.tile), reps, model, device)
            peaks[form, batch] = untiled_peak, tiled_peak
            diff = _largest_relative_difference(tiled_grads, untiled_grads)
            grads = ", ".join(f"{name} {value:.1e}" for name, value in diff.items())
            print(
                f"{form:>6} {batch:>6} {untiled_peak / 2**20:>12.1f} {tiled_peak / 2**20:>10.1f} "
                f"{tiled_peak / untiled_peak:>13.3f} {abs(tiled_loss - untiled_loss) / abs(untiled_loss):>13.1e}  "
                f"{grads}"
            )
            del reps, model, untiled_grads, tiled_grads
    first = args.batches[0]
    for form in args.forms:
        for batch in args.batches[1:]:
            (u0, t0), (u1, t1) = peaks[form, first], peaks[form, batch]
            print(
                f"{form}: B {first} -> {batch} (x{batch / first:g}): untiled peak x{u1 / u0:.1f}, "
                f"tiled peak x{t1 / t0:.1f} (B^2 would be x{(batch / first) ** 2:g})"
            )


if __name__ == "__main__":
    main()
