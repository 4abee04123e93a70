"""``python -m vlhub.check`` (``vlhub-check``): run the rows, print the table, write the report.

python -m vlhub.check                       # everything this machine can run
python -m vlhub.check --quick               # the correctness rows only
python -m vlhub.check --out check-today model.config.vision_cfg.layers=1   # Hydra overrides for every row
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from pathlib import Path

OPTIONAL = ("wandb",)  # imported by timm and open_clip when installed, never used by the check


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vlhub.check",
        description="Does this machine train every vlhub objective correctly, and how fast? "
        "Prints one table and writes check.json and check.md; exits non-zero when a row fails.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every row (KEY=VALUE)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: ./check-<date>)")
    parser.add_argument("--quick", action="store_true", help="the correctness rows only (no compile, no speed)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when visible, else cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="per-process batch of the correctness rows")
    parser.add_argument("--large", action="store_true", help="also the gradient cache at logical 262,144, tiled loss")
    parser.add_argument("--data", default=None, help="time the loader on these webdataset shards (a shard spec)")
    parser.add_argument("--objectives", default=None, help="only these registered objectives (comma-separated)")
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error(f"--batch-size={args.batch_size}: needs at least 2 (contrastive losses need negatives)")
    for override in args.overrides:
        if "=" not in override:
            parser.error(f"override {override!r} is not KEY=VALUE")
    return args


def plan(args: argparse.Namespace, folder: Path):
    """The rows to run, in order, as (section, name, thunk)."""
    import torch

    from vlhub.check import correctness, ranks
    from vlhub.check.trainers import CheckSettings, default_precision
    from vlhub.registry import list_objectives

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={args.device}: no CUDA GPU is visible to this process (use --device cpu)")
    settings = CheckSettings(str(device), default_precision(device), args.batch_size, list(args.overrides))
    names = args.objectives.split(",") if args.objectives else list_objectives()
    rows = [
        (
            "correctness",
            f"{name}: 2 steps, {settings.precision}",
            lambda n=name: correctness.objective_row(settings, n, folder),
        )
        for name in names
    ]
    rows.append(("correctness", "grad cache = plain step", lambda: correctness.grad_cache_row(settings, folder)))
    if not args.quick:
        rows.append(("correctness", "compile on = off", lambda: correctness.compile_row(settings, folder)))
    rows.append(("correctness", "checkpoint read back", lambda: correctness.checkpoint_row(settings, folder)))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    for strategy in ("ddp", "fsdp"):
        name = f"{strategy} on all GPUs = one process"
        if gpus >= 2:
            run_ranks = lambda s=strategy: ranks.distributed_row(settings, s, gpus, folder)  # noqa: E731
            rows.append(("correctness", name, run_ranks))
        else:
            rows.append(("correctness", name, f"needs 2 or more GPUs; {gpus} visible"))
    if not args.quick:
        from vlhub.check.input import input_rows
        from vlhub.check.speed import Measurements, SpeedSpec, speed_rows

        measured = Measurements(settings, folder, SpeedSpec.for_device(device))
        rows += [*speed_rows(measured, args.large), *input_rows(measured, args.data)]
    return device, settings, rows


def run(args: argparse.Namespace) -> int:
    import torch

    from vlhub.check.rows import UNTESTED, Row, failed_names, format_table, passed, run_row, write_report
    from vlhub.check.versions import environment_rows

    folder = args.out or Path(f"check-{datetime.datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}")
    folder.mkdir(parents=True, exist_ok=True)
    device, settings, planned = plan(args, folder)
    print(f"vlhub check on {device} ({settings.precision}); report in {folder.resolve()}", flush=True)
    start, rows = time.perf_counter(), []
    for section, name, thunk in planned:
        row = Row(section, name, UNTESTED, thunk) if isinstance(thunk, str) else run_row(section, name, thunk)
        print(f"  {row.status:<13} {name} ({row.seconds:.1f}s)", flush=True)
        rows.append(row)
    rows += environment_rows(device)
    header = {
        "device": str(device),
        "precision": settings.precision,
        "batch_size": settings.batch_size,
        "overrides": settings.overrides,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - start, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    write_report(folder, rows, header)
    print(format_table(rows))
    if not passed(rows):
        print(f"FAILED: {', '.join(failed_names(rows))} (details in {folder / 'check.md'})", file=sys.stderr)
        return 1
    print(f"all rows passed in {header['seconds']:.0f}s; report in {folder / 'check.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


def block_unused_imports() -> None:
    """Optional packages the check never uses stay unloaded (wandb, which timm and open_clip import
    when it is installed: a slow import that may reach for its settings). Only for the command:
    in a process that uses them (the test suite) they stay importable."""
    for name in OPTIONAL:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # ``import wandb`` raises ImportError


def cli() -> None:
    """The command: offline, nothing optional imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    block_unused_imports()
    sys.exit(main())
