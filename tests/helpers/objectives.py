"""Objectives ready for a step on the micro model, a real batch for each, and a recording objective."""

from __future__ import annotations

import torch

from tests.helpers.models import micro_model
from vlhub.objectives import ClipObjective

# Heads narrowed for the micro model unless a test says otherwise: SLIP's paper projector (4,096 wide,
# 18M parameters against the micro image tower's 0.25M) costs seconds in every test it enters and
# checks nothing its 64-wide twin of the same depth does not (its widths: unit/objectives/test_slip.py).
TEST_HEADS = {"slip": {"ssl_hidden_dim": 64}}


def objective_batch(model, objective, size: int = 8, seed: int = 0):
    """A real training batch for ``objective`` (its views, text and labels) from the synthetic shapes,
    images normalised with the model's statistics (what ``represent`` sees)."""
    from vlhub.augment import build_clip_transforms, build_simclr_transforms
    from vlhub.data import SyntheticShapes, build_train_loader
    from vlhub.data.batch import move_batch

    transforms = build_clip_transforms(model.image_stats)
    views = build_simclr_transforms(model.image_stats)  # the defaults: augment=clip, augment_views=simclr
    tokenizer = model.tokenizer if objective.needs_text else None
    loader = build_train_loader(
        SyntheticShapes(num_samples=256),
        transforms.train,
        tokenizer,
        size,
        seed,
        image_views=objective.image_views,
        view_transform=views.train,
    )
    stats = model.image_stats
    return move_batch(next(iter(loader)).batch, torch.device("cpu"), None, stats.mean, stats.std)


def gradients(model, objective, batch, strategy, precision: str = "fp32"):
    """(the model's gradients after one ``strategy`` pass on ``batch``, unscaled by the fp16 loss scaler; the
    loss parts), from zeroed gradients."""
    from vlhub.engine.precision import Precision

    model.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    prec = Precision(precision, torch.device("cpu"))
    parts = strategy(model, objective, batch, prec)
    scale = prec.scaler.get_scale() if prec.scaler is not None else 1.0
    grads = {n: p.grad.detach().clone() / scale for n, p in model.named_parameters() if p.grad is not None}
    return grads, parts


def prepared_objective(name: str, **kwargs):
    """(micro model, objective ``name`` fitted to the synthetic data and that model), seeded."""
    from vlhub.data import SyntheticShapes
    from vlhub.registry import OBJECTIVES

    torch.manual_seed(0)
    model, objective = micro_model(), OBJECTIVES.build(name, **{**TEST_HEADS.get(name, {}), **kwargs})
    objective.apply_to_data(SyntheticShapes(num_samples=8))
    objective.apply_to_model(model)
    objective.apply_init(model)
    return model, objective


class RecordingClip(ClipObjective):
    """Records every ``represent`` output, to compare a chunk's first pass with its replay."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def represent(self, model, batch):
        reps = super().represent(model, batch)
        self.seen.append({k: v.detach().clone() for k, v in reps.items()})
        return reps


def evaluate_on_shapes(model, objective, num_samples: int = 30) -> dict[str, float]:
    """The synthetic shapes' evaluation scored as ``objective`` scores images (zero-shot, classifier or probe)."""
    from vlhub.api import eval_transform
    from vlhub.eval import SyntheticZeroShot
    from vlhub.eval.context import EvalContext

    scoring = objective.scoring(model)
    context = EvalContext("synthetic", eval_transform(model), torch.device("cpu"), batch_size=16, scoring=scoring)
    return SyntheticZeroShot(num_samples=num_samples, image_size=32).run(model, context)
