"""Opt-in: sweeps and multi-task jobs on a real SLURM cluster through Hydra's submitit launcher.

bash tests/slurm/start_local_cluster.sh && VLHUB_SLURM_TESTS=1 python -m pytest tests/test_slurm.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST

pytestmark = pytest.mark.skipif(
    os.environ.get("VLHUB_SLURM_TESTS") != "1" or shutil.which("sbatch") is None,
    reason="set VLHUB_SLURM_TESTS=1 with a running SLURM cluster (tests/slurm/start_local_cluster.sh)",
)
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=10",
]


def _launch(tmp_path: Path, *overrides: str) -> None:
    command = [sys.executable, "-m", "vlhub.train", "-m", *SLURM, *FAST, f"hydra.sweep.dir={tmp_path}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_sweep_becomes_a_job_array(tmp_path):
    _launch(tmp_path, "optim.lr=1e-3,3e-4")
    for job in ("0", "1"):
        record = json.loads((tmp_path / job / "results.jsonl").read_text().splitlines()[-1])
        assert record["step"] == 3


def test_the_tasks_of_a_job_train_as_ranks(tmp_path):
    _launch(tmp_path, "hydra.launcher.tasks_per_node=2")
    checkpoint = torch.load(tmp_path / "0/checkpoints/latest.pt", weights_only=True)
    assert checkpoint["data"]["world_size"] == 2 and checkpoint["step"] == 3
    assert len((tmp_path / "0/results.jsonl").read_text().splitlines()) == 1  # rank 0 alone evaluates
    assert (tmp_path / "0/train_rank1.log").is_file()
