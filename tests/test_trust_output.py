"""Issue 11, what a person sees: optimizer recipes per model (6), the run folder, progress and
final table (16), the default evaluation following the data (17), ``--help`` (18), and opening
any checkpoint in open_clip (19)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_train, micro_model
from tests.test_config import options
from vlhub.optim import OptimRecipe

# -- 6: every model option comes with the optimizer recipe that trains it stably ---------------


def test_vit_b32_composes_to_open_clips_published_recipe():
    optim = compose_train(["model=vit_b32"]).optim
    assert optim.optimizer._target_ == "torch.optim.AdamW"
    assert list(optim.optimizer.betas) == [0.9, 0.98] and optim.optimizer.eps == 1e-6
    assert (optim.lr, optim.weight_decay, optim.warmup_steps) == (5e-4, 0.2, 2000)
    assert optim.reference_batch_size == 32768


def test_every_model_option_brings_a_recipe_and_tiny_keeps_its_fast_one():
    for model in options("model"):
        optim = compose_train([f"model={model}"]).optim
        if model == "tiny":  # the CPU default keeps its speed: lr 2e-3, 100 warmup steps, unscaled
            assert (optim.lr, optim.warmup_steps, optim.get("reference_batch_size")) == (2e-3, 100, None)
        else:  # the big towers: open_clip's recipe (the vit_b32 diverged at lr 2e-3, warmup 100)
            assert optim.lr <= 5e-4 and optim.warmup_steps >= 2000 and optim.reference_batch_size == 32768


def test_the_command_line_still_wins_over_a_models_recipe():
    cfg = compose_train(["model=vit_b32", "optim.lr=1e-4", "optim.warmup_steps=10"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (1e-4, 10)
    for overrides in (["model=vit_b32", "optim=sgd"], ["optim=sgd", "model=vit_b32"]):
        optim = compose_train(overrides).optim
        assert optim.optimizer._target_ == "torch.optim.SGD" and optim.lr == 0.05


def test_a_recipe_is_scaled_down_to_the_runs_global_batch():
    recipe = OptimRecipe(torch.optim.AdamW, lr=5e-4, weight_decay=0.2, scheduler="cosine", warmup_steps=2000)
    recipe.reference_batch_size = 32768
    model = micro_model()
    for batch, lr, warmup in ((256, 5e-4 / 8**0.5 / 4, 22627), (4096, 5e-4 / 8**0.5, 5657), (65536, 5e-4, 2000)):
        _, scheduler = recipe.build([model], max_steps=100_000, batch_size=batch)
        assert scheduler.base_lrs[0] == pytest.approx(lr)
        assert scheduler.lr_lambdas[0].keywords["warmup_steps"] == warmup
    recipe.reference_batch_size = None  # as given
    _, scheduler = recipe.build([model], max_steps=100_000, batch_size=256)
    assert scheduler.base_lrs[0] == 5e-4 and scheduler.lr_lambdas[0].keywords["warmup_steps"] == 2000
