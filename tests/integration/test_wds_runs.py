"""Training on streamed shards: the exact bad-sample count and its limit, a run killed mid-epoch and resumed
with other workers equal to a straight run, and shard settings that fail at launch naming the key."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import vlhub.train
from tests.helpers.shards import shards_with_one_bad_sample_each, tagged_shards
from vlhub.engine.trainer import Trainer


def test_a_wds_run_records_its_exact_bad_sample_count_and_stops_past_the_limit(tmp_path):
    from tests.helpers.configs import run_train

    root = shards_with_one_bad_sample_each(tmp_path / "shards")
    data = ["data=wds", f'data.root="{root}"', "data.num_samples=24", "data.shuffle_buffer=0", "eval=none"]
    run_train([*data, "data.max_bad_fraction=0.3"], tmp_path / "run")  # 3 steps of 8 = every shard once
    record = json.loads((tmp_path / "run/results.jsonl").read_text().splitlines()[-1])
    assert (record["step"], record["data/bad_samples"], record["data/samples_read"]) == (3, 6, 24)
    with pytest.raises(RuntimeError, match="bad.*data.max_bad_fraction=0.2"):
        run_train([*data, "data.max_bad_fraction=0.2", "data.bad_fraction_min_samples=8"], tmp_path / "strict")


@pytest.mark.slow
def _killed_in_step_5(overrides: list[str], run_dir: str) -> None:
    """Train, and be SIGKILLed in the middle of step 5 (after the step-3 checkpoint): no handler runs."""
    from tests.helpers.configs import run_train

    real_step, calls = Trainer.train_on_batch, []

    def step_then_killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*args, **kwargs)

    Trainer.train_on_batch = step_then_killed  # this forked process only
    run_train(overrides, Path(run_dir))


def test_a_wds_run_killed_mid_epoch_and_resumed_with_other_workers_equals_a_straight_run_bit_for_bit(tmp_path):
    from tests.helpers.configs import RESUME, run_train
    from tests.helpers.tensors import saved_weights

    root = tagged_shards(tmp_path / "shards", "s", shards=4, per_shard=12)
    data = ["data=wds", f'data.root="{root}"', "data.workers=2", "data.shuffle_buffer=6"]  # 48 samples, 6 steps
    run_train([*RESUME, *data, "trainer.max_steps=6"], tmp_path / "straight")
    killed = mp.get_context("fork").Process(
        target=_killed_in_step_5, args=([*RESUME, *data, "trainer.max_steps=6"], str(tmp_path / "resumed"))
    )
    killed.start()
    killed.join(120)
    assert killed.exitcode == -signal.SIGKILL
    assert torch.load(tmp_path / "resumed/checkpoints/latest.pt", weights_only=True)["step"] == 3
    # checkpoint.resume=auto, with another data.workers: the stream does not depend on it (vlhub.data.layout)
    run_train([*RESUME, *data, "data.workers=0", "trainer.max_steps=6"], tmp_path / "resumed")
    straight, resumed = (saved_weights(tmp_path / f"{run}/checkpoints/latest.pt") for run in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ("[inf,1]", r"data.weights\[0\]=inf: a weight must be a finite number > 0"),
        ("[1e308,1e308]", r"data.weights: the weights \[1e\+308, 1e\+308\] sum past the largest float"),
        ("[true,1]", r"data.weights=\[True, 1\]: expected a list of float or null"),
        ("[.inf,1]", r"data.weights=\['.inf', 1\]: expected a list of float or null"),
    ],
)
def test_weights_that_the_sampler_cannot_use_fail_at_launch_naming_the_key(tmp_path, weights, match):
    from tests.helpers.configs import run_train

    root = tagged_shards(tmp_path / "x", "s", shards=4, per_shard=4)
    overrides = ["data=wds", f'data.root="{root}::{root}"', f"data.weights={weights}", "data.workers=0"]
    with pytest.raises(Exception, match=match):
        run_train(overrides, tmp_path / "run")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data=wds", "data.root=/x/{00000..00002}.tar"], "data.root=/x/{00000..00002}.tar: Hydra cannot parse"),
        (["data=wds", "data.root=/x/00000.tar", "data.root=/x/00001.tar"], "data.root is given 2 times"),
    ],
)
def test_an_unquoted_brace_pattern_fails_in_one_line_naming_data_root(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vlhub.train", *argv])
    with pytest.raises(SystemExit) as exit_:
        vlhub.train.main()
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and message in error.splitlines()[0]
    assert """'data.root="/""" in error  # the quoting that works
