"""DDP on CPU (gloo): two ranks at batch 16 train exactly like one process at batch 32."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.configs import COMPARABLE, run_train
from tests.helpers.ranks import free_port, group_torn_down, start_ranks, train_as_rank
from tests.helpers.shards import batches, shards_with_one_bad_sample_each
from tests.helpers.tensors import relative_error
from vlhub.data import SyntheticShapes, WebDatasetPairs


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)


def _assert_same_layout(ran: dict, single: dict) -> None:
    """Whichever strategy wrote it, a checkpoint has one process's keys and optimizer layout."""
    assert list(ran["state_dict"]) == list(single["state_dict"])
    assert ran["objective"].keys() == single["objective"].keys()
    assert ran["optimizer"]["param_groups"] == single["optimizer"]["param_groups"]
    assert ran["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()


def _assert_trains_like_one_process(run_dir: Path, single_dir: Path) -> None:
    ran, single = _checkpoint(run_dir), _checkpoint(single_dir)
    assert ran["step"] == single["step"] == 3
    _assert_same_layout(ran, single)
    relative = relative_error(ran["state_dict"], single["state_dict"])
    print(f"relative weight difference vs one process: {relative:.2e}")
    assert relative <= 1e-5
    # Loss-only parameters are averaged by hand (outside DDP), each checked on its own since its share
    # of the total norm is tiny: the temperature, and SigLIP's bias (the objective's).
    loss_only = {"logit_scale": (ran["state_dict"], single["state_dict"])}
    loss_only |= {f"objective.{k}": (ran["objective"], single["objective"]) for k in single["objective"]}
    for key, (mine, theirs) in loss_only.items():
        name = key.removeprefix("objective.")
        assert torch.allclose(mine[name], theirs[name], rtol=1e-5, atol=1e-7), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference run of clip at batch 32 in one process, shared by the 2-rank clip checks."""
    run_dir = tmp_path_factory.mktemp("single")
    run_train([*COMPARABLE, "trainer.batch_size=32"], run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["objective=siglip", "trainer.grad_cache.enabled=true", "trainer.grad_cache.chunk_size=8"]],
    ids=["clip", "siglip_grad_cache"],
)
def test_ddp_two_ranks_at_16_match_one_process_at_32(tmp_path, extra, request):
    """trainer.strategy=auto is ddp on two ranks: towers in DDP, the rest averaged by hand."""
    single = tmp_path / "single"
    if extra:
        run_train([*COMPARABLE, *extra, "trainer.batch_size=32"], single)
    else:
        single = request.getfixturevalue("one_process")
    start_ranks(train_as_rank, [*COMPARABLE, *extra, "trainer.batch_size=16"], str(tmp_path / "ddp"))
    _assert_trains_like_one_process(tmp_path / "ddp", single)


@pytest.mark.slow
def test_torchrun_launches_two_cpu_ranks(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(free_port()),
        "-m",
        "vlhub.train",
        "model=tiny",
        "trainer.batch_size=16",
        "trainer.max_steps=2",
        "data.workers=0",
        "eval.synthetic.num_samples=60",
        "logger.tensorboard=false",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints/latest.pt").is_file()
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes the record
    assert (tmp_path / "train_rank1.log").is_file()


@pytest.mark.slow
def test_bad_samples_are_summed_over_ranks(tmp_path):
    import json

    csv = SyntheticShapes(num_samples=32).write_csv(tmp_path / "data")
    for index in (3, 20, 30):
        (tmp_path / "data" / "images" / f"{index:06d}.png").unlink()
    overrides = [
        "data=csv",
        f"data.root={csv}",
        "data.workers=0",
        "data.max_bad_fraction=0.5",
        "eval=synthetic",
        "eval.synthetic.num_samples=30",
        "trainer.max_steps=2",
        "checkpoint.every_n_steps=0",
    ]
    start_ranks(train_as_rank, [*overrides, "trainer.batch_size=8"], str(tmp_path / "ddp"))
    record = json.loads((tmp_path / "ddp/results.jsonl").read_text().splitlines()[-1])
    assert record["data/bad_samples"] == 3  # 32 rows read over 2 steps x 2 ranks x 8: all three missing files
    checkpoint = torch.load(tmp_path / "ddp/checkpoints/latest.pt", weights_only=True)
    assert checkpoint["data"]["samples_read"] == 32 and checkpoint["data"]["bad_samples"] == 3


def _slurm_task_main(task: int, port: int, overrides: list[str], run_dir: str) -> None:
    # What SLURM gives each task of a 2-task, 1-node job (as submitit's tasks see it); no RANK.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        os.environ.pop(name, None)
    os.environ.update(
        SLURM_JOB_ID="4242",
        SLURM_STEP_ID="0",
        SLURM_NTASKS="2",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_NODELIST="localhost",
        SLURM_PROCID=str(task),
        SLURM_LOCALID=str(task),
        MASTER_PORT=str(port),
    )
    with group_torn_down():
        run_train(overrides, Path(run_dir))


@pytest.mark.slow
def test_slurm_tasks_become_ranks_under_the_manual_strategy(tmp_path, one_process):
    """SLURM's environment makes two ranks; the manual all-reduce (after the backward) is exact too."""
    start_ranks(
        _slurm_task_main, [*COMPARABLE, "trainer.strategy=manual", "trainer.batch_size=16"], str(tmp_path / "slurm")
    )
    _assert_trains_like_one_process(tmp_path / "slurm", one_process)


@pytest.mark.skipif(not os.environ.get("VLHUB_LONG_TESTS"), reason="two spawned ranks (~35 s): VLHUB_LONG_TESTS=1")
def test_two_ranks_train_past_an_epoch_end_and_sum_their_bad_samples(tmp_path):

    from tests.helpers.configs import COMPARABLE
    from tests.helpers.ranks import train_as_rank

    root = shards_with_one_bad_sample_each(tmp_path / "shards")
    data = ["data=wds", f'data.root="{root}"', "data.num_samples=24", "data.max_bad_fraction=0.4"]
    steps = [*COMPARABLE, *data, "trainer.batch_size=4", "trainer.max_steps=5"]  # 3 steps an epoch: ends in epoch 1
    start_ranks(train_as_rank, steps, str(tmp_path / "ddp"))
    record = json.loads((tmp_path / "ddp/results.jsonl").read_text().splitlines()[-1])
    source = WebDatasetPairs(root, num_samples=24, max_bad_fraction=0.4)
    expected = sum(b.bad_samples for r in (0, 1) for b in batches(source, 5, 4, rank=r, world_size=2))
    assert (record["step"], record["epoch"], record["data/bad_samples"]) == (5, 1, expected)
    assert record["data/samples_read"] == 5 * 2 * 4
