"""trainer.strategy on one process: what runs, and what fails at launch naming the key.

The two-rank checks (ddp and manual against one process, checkpoint keys) are in tests/test_ddp.py
and tests/test_objectives_ddp.py, which share their process spawns.
"""

import re

import pytest
import torch

from tests.conftest import run_train
from vlhub.distributed import DistInfo
from vlhub.engine.parallel import ManualAllReduce, ParallelStrategy, build_parallel
from vlhub.launch import errors_reported

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
