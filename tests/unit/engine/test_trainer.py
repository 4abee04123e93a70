"""The training step and loop: precision, clipping, evaluation cadence."""

import pytest
import torch

from tests.helpers.models import micro_model
from tests.helpers.objectives import objective_batch
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients, train_step
from vlhub.objectives import ClipObjective
from vlhub.optim import OptimRecipe


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model, objective = micro_model(), ClipObjective()
    batch = objective_batch(model, objective, size=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = OptimRecipe(torch.optim.SGD, lr=1.0, weight_decay=0.0, scheduler="constant", warmup_steps=0)
    optimizer, scheduler = recipe.build([model], max_steps=10)
    parts = train_step(
        model,
        objective,
        batch,
        optimizer,
        scheduler,
        Precision("fp32", torch.device("cpu")),
        PlainGradients(),
        grad_clip_norm=1e-3,
    )
    assert parts["grad_norm"] > 1e-3  # the raw gradient was larger than the bound...
    moved = torch.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in model.named_parameters()))
    assert moved.item() == pytest.approx(1e-3, rel=1e-3)  # ...and plain SGD moved exactly lr * bound


def test_a_fixed_batch_is_fit_and_the_loss_drops():
    torch.manual_seed(0)
    model, objective = micro_model(), ClipObjective()
    batch = objective_batch(model, objective, size=16)
    recipe = OptimRecipe(torch.optim.AdamW, lr=2e-3, weight_decay=0.0, scheduler="constant", warmup_steps=0)
    optimizer, scheduler = recipe.build([model, objective], max_steps=100)
    precision = Precision("fp32", torch.device("cpu"))
    losses = [
        float(train_step(model, objective, batch, optimizer, scheduler, precision, PlainGradients(), None)["loss"])
        for _ in range(30)
    ]
    assert losses[-1] < 0.5 * losses[0]
