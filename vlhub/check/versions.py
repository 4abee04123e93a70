"""The environment rows: versions of what training runs on, and the device it found."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import torch

from vlhub.check.rows import FAIL, INFO, Row

# What a bare GPU machine (torch, open_clip, timm, hydra) may lack: the check must not need it.
UNNEEDED = ("sklearn", "scipy", "wandb", "matplotlib", "pandas")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str:
    """The NVIDIA driver version, from nvidia-smi (torch does not expose it)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({type(error).__name__})"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def device_description(device: torch.device) -> str:
    if device.type != "cuda":
        return f"cpu ({torch.get_num_threads()} threads)"
    count = torch.cuda.device_count()
    return f"{count} x {torch.cuda.get_device_name(device)}"


def environment_rows(device: torch.device) -> list[Row]:
    """torch, CUDA, NCCL, driver, open_clip, timm and hydra versions; a missing package is a failure."""
    rows = [Row("environment", "torch", INFO, torch.__version__)]
    if device.type == "cuda":
        nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
        rows += [
            Row("environment", "device", INFO, device_description(device)),
            Row("environment", "CUDA", INFO, str(torch.version.cuda)),
            Row("environment", "NCCL", INFO, ".".join(map(str, nccl)) if nccl else "not available"),
            Row("environment", "driver", INFO, _driver()),
        ]
    else:
        rows.append(Row("environment", "device", INFO, f"{device_description(device)}; no CUDA device visible"))
    for package in ("open_clip_torch", "timm", "hydra-core"):
        version = _version(package)
        rows.append(Row("environment", package, INFO if version else FAIL, version or "not installed"))
    loaded = sorted(name for name in UNNEEDED if sys.modules.get(name) is not None)
    rows.append(Row("environment", "unneeded imports", INFO, ", ".join(loaded) or "none"))
    return rows
