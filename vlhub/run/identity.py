"""``run.json``: which run a folder holds, and what each of its launches ran on.

The run id is drawn when a run starts and written into every checkpoint, so rotation and resume
only look at the run's own files. Each launch appends its step and environment: two jobs with the
same config can still differ in the code that ran them, the torch release, the device or the
number of ranks; ``python -m vlhub.compare`` reads these records and reports any such difference
between the jobs it compares as a confound. (The precision is a config key, ``trainer.precision``,
so it is compared with the config.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch

import vlhub
from vlhub.parallel.environment import DistInfo

IDENTITY = "run.json"


def read_run_id(run_dir: Path) -> str | None:
    """The run id ``run.json`` names (None without one)."""
    identity = run_dir / IDENTITY
    return json.loads(identity.read_text()).get("run_id") if identity.is_file() else None


def write_identity(run_dir: Path, run_id: str, launch: dict[str, Any] | None = None) -> None:
    """``run.json`` naming ``run_id``; with ``launch``, listed after the run's earlier launches (none
    for another run's file). Without, the id alone (a run restored from its remote, not launched yet)."""
    record: dict[str, Any] = {"run_id": run_id}
    if launch is not None:
        record["launches"] = [*_launches(run_dir / IDENTITY, run_id), launch]
    (run_dir / IDENTITY).write_text(json.dumps(record) + "\n")


def _launches(identity: Path, run_id: str) -> list[dict[str, Any]]:
    """The launches ``run.json`` lists for this run (none for another run's file or an older one)."""
    try:
        held = json.loads(identity.read_text())
    except (OSError, ValueError):
        return []
    launches = held.get("launches") if isinstance(held, dict) and held.get("run_id") == run_id else None
    return launches if isinstance(launches, list) else []


# -- what a launch ran on --------------------------------------------------------------------------
def vlhub_revision() -> str:
    """``git describe --always --dirty`` of the checkout vlhub is imported from; the package
    version when it is not a git checkout (an installed wheel) or git is unavailable."""
    root = Path(vlhub.__file__).resolve().parent.parent
    if (root / ".git").exists():  # a folder, or a file in a git worktree
        try:
            done = subprocess.run(
                ["git", "-C", str(root), "describe", "--always", "--dirty", "--tags"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            return f"git {done.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return f"version {vlhub.__version__}"


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda (NVIDIA H100 80GB HBM3)``: the accelerator's model, not only its kind."""
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def launch_environment(dist_info: DistInfo) -> dict[str, Any]:
    """This launch's code, torch release, device and number of ranks."""
    return {
        "vlhub": vlhub_revision(),
        "torch": torch.__version__,
        "device": device_name(dist_info.device),
        "world_size": dist_info.world_size,
    }
