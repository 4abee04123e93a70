"""Many nodes: ranks from SLURM's and torchrun's environments, and two torchrun "nodes" on this machine
training like one process at the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.ranks import free_port
from tests.helpers.tensors import relative_error
from vlhub.parallel.environment import cuda_index, get_dist_info, slurm_tasks_on_node

# A 3-node SLURM job with 2 + 2 + 1 tasks, seen from its 4th task (node 1's second).
SLURM_TASK = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "5",
    "SLURM_JOB_NUM_NODES": "3",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_TASKS_PER_NODE": "2(x2),1",
    "SLURM_JOB_NODELIST": "gpu[07-08],gpu11",
}


def test_a_slurm_task_on_the_second_node_knows_its_rank_local_rank_and_neighbours(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    info = get_dist_info("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 5, 1, 2)


def test_torchrun_variables_win_over_slurm_and_give_the_local_world(monkeypatch):
    torchrun = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    for name, value in {**SLURM_TASK, **torchrun}.items():
        monkeypatch.setenv(name, value)
    info = get_dist_info("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (6, 8, 2, 4)


def test_tasks_per_node_and_gpu_choice():
    assert [slurm_tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert slurm_tasks_on_node("8", 0) == 8
    assert cuda_index(3, 8) == 3  # every task sees the node's GPUs: its own
    assert cuda_index(3, 1) == 0  # SLURM bound one GPU to the task
    with pytest.raises(ValueError, match="trainer.device=cuda: local rank 4 but only 2 GPUs"):
        cuda_index(4, 2)


COMMON = [
    "model=tiny",
    "eval=none",
    "data.workers=0",
    "optim.scheduler=constant",
    "optim.lr=1e-3",
    "trainer.max_steps=3",
    "checkpoint.every_n_steps=0",
    "logger.tensorboard=false",
]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)


@pytest.mark.skipif(not os.environ.get("VLHUB_LONG_TESTS"), reason="4 processes on 2 cores, ~1 min: VLHUB_LONG_TESTS=1")
def test_two_torchrun_nodes_of_two_ranks_train_like_one_process_at_four_times_the_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=2",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "vlhub.train",
                *COMMON,
                "trainer.batch_size=4",
                f"hydra.run.dir={tmp_path / 'nodes'}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    single = subprocess.run(
        [sys.executable, "-m", "vlhub.train", *COMMON, "trainer.batch_size=16", f"hydra.run.dir={tmp_path / 'one'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    multi, one = _weights(tmp_path / "nodes"), _weights(tmp_path / "one")
    assert multi["data"]["world_size"] == 4 and multi["step"] == one["step"] == 3
    relative = relative_error(multi["state_dict"], one["state_dict"])
    print(f"relative weight difference, 2 nodes x 2 ranks at 4 vs one process at 16: {relative:.2e}")
    assert relative <= 1e-5
    # Every rank logged under rank 0's run folder; ranks 2 and 3 are node 1's local ranks 0 and 1.
    assert sorted(p.name for p in (tmp_path / "nodes").glob("train_rank*.log")) == [
        "train_rank1.log",
        "train_rank2.log",
        "train_rank3.log",
    ]
