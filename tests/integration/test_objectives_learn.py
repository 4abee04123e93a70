"""Every text-bearing objective, with its defaults, learns the synthetic shapes: zero-shot top-1 of
at least 4x chance (chance is 1/30) within a few hundred steps. Several minutes on 2 cores, so
opt-in: ``VLHUB_LONG_TESTS=1 python -m pytest tests/integration/test_objectives_learn.py``."""

import os

import pytest

from tests.helpers.configs import run_train
from vlhub.registry import OBJECTIVES

TEXT_BEARING = [name for name in OBJECTIVES.names() if OBJECTIVES.get(name).needs_text]
CHANCE = 1 / 30


@pytest.mark.skipif(not os.environ.get("VLHUB_LONG_TESTS"), reason="minutes per objective: VLHUB_LONG_TESTS=1")
@pytest.mark.parametrize("name", TEXT_BEARING)
def test_every_text_bearing_objective_learns_the_synthetic_shapes(tmp_path, name):
    metrics = run_train(
        [
            f"objective={name}",
            "trainer.max_steps=300",
            "trainer.batch_size=64",
            "trainer.log_every_n_steps=100",
            "optim.warmup_steps=30",
            "eval.synthetic.num_samples=300",
        ],
        tmp_path,
        {"model": "tiny", "objective": name},
    )
    assert metrics["synthetic-zeroshot-top1"] >= 4 * CHANCE, metrics
