"""trainer.strategy on one process: what runs, and what fails at launch naming the key.

Also, on two ranks: the step's non-finite flag summed in the gradient all-reduce. The two-rank
training checks (ddp and manual against one process, checkpoint keys) are in tests/distributed/test_ddp.py
and tests/distributed/test_objectives_ddp.py, which share their process spawns.
"""

import re

import pytest
import torch

from tests.helpers.configs import run_train
from tests.helpers.ranks import as_rank, start_ranks
from vlhub.launch import errors_reported
from vlhub.parallel import collectives
from vlhub.parallel.build import build_parallel
from vlhub.parallel.environment import DistInfo
from vlhub.parallel.manual import ManualAllReduce
from vlhub.parallel.strategy import ParallelStrategy

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_auto_on_one_process_shares_nothing_and_manual_is_a_no_op():
    assert type(build_parallel("auto", ONE)) is ParallelStrategy
    assert isinstance(build_parallel("manual", ONE), ManualAllReduce)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("dpp", r"trainer.strategy='dpp' is not a strategy: one of auto, ddp, fsdp, manual"),
        ("ddp", r"trainer.strategy=ddp needs several processes in a process group, and this run is one process"),
        ("fsdp", r"trainer.strategy=fsdp"),
    ],
)
def test_a_strategy_that_cannot_run_fails_at_launch_in_one_line(tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as raised, errors_reported():
        run_train([f"trainer.strategy={value}"], tmp_path / "run")
    assert raised.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert lines[0].startswith("error: ")
    assert re.search(message, lines[0])
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any step


def _finish_on_two_ranks(rank: int, port: int, out: str) -> None:
    with as_rank(rank, port, init=True):
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 2)]
        for index, param in enumerate(params):
            param.grad = torch.full_like(param, float(10 * rank + index))
        params[2].grad = params[2].grad if rank == 1 else None  # reached on rank 1 only
        # A 4-element bucket: three collectives, the flags in the last; one flag a device-side bool.
        flags = [torch.tensor(rank == 1), float(rank + 1)]
        summed = collectives.all_reduce_grads_(params, bucket_elements=4, flags=flags)
        alone = ManualAllReduce(info).finish_gradients([], flags=[torch.tensor(True)])  # no gradient to carry them
        torch.save({"summed": summed, "alone": alone, "grads": [p.grad for p in params]}, f"{out}/{rank}.pt")


@pytest.mark.slow
def test_flags_ride_the_gradient_all_reduce_and_are_summed_on_every_rank(tmp_path):
    start_ranks(_finish_on_two_ranks, str(tmp_path))
    for rank in (0, 1):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert result["summed"] == [1, 3]  # one rank's loss not finite; 1 + 2
        assert result["alone"] == [2]
        means = [(0 + 10) / 2, (1 + 11) / 2, (0 + 12) / 2]  # a gradient missing on a rank counts as zeros
        for grad, mean in zip(result["grads"], means, strict=True):
            assert torch.equal(grad, torch.full_like(grad, mean))
