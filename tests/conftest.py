"""The process set-up every test shares (one torch thread, offline) and the shared fixtures.
Helpers live in ``tests/helpers/``; tests import them from there."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers.configs import cache_config_files, run_train  # noqa: E402
from tests.helpers.models import micro_model  # noqa: E402

torch.set_num_threads(1)
cache_config_files()  # each YAML file parsed once per session (Hydra parses it in every compose)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint of a finished 2-step tiny clip run (no evaluation), one for the whole session:
    tests only read it (copy it before changing anything)."""
    run_dir = tmp_path_factory.mktemp("trained_checkpoint")
    run_train(["eval=none", "trainer.max_steps=2"], run_dir)
    return run_dir / "checkpoints" / "latest.pt"


@pytest.fixture(scope="session")
def eval_layouts(tmp_path_factory) -> dict[str, Path]:
    """Every dataset task's folder in its real layout (tests/helpers/eval_folders.py), generated once for the
    session (thousands of small files): tests only read them."""
    from tests.helpers.eval_folders import make_fine_grained_layouts, make_imagenet_layouts

    base = tmp_path_factory.mktemp("eval_layouts")
    return {**make_imagenet_layouts(base), **make_fine_grained_layouts(base)}


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return micro_model()
