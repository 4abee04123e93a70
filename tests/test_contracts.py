"""Contract tests: every registered component, by name, meets its interface.

A new component is enrolled by registering it; a registry entry without a case here fails.
"""

import pytest
import torch

import vlhub.augment  # noqa: F401  (registers transforms)
import vlhub.data  # noqa: F401
import vlhub.eval  # noqa: F401
import vlhub.models  # noqa: F401
import vlhub.objectives  # noqa: F401
import vlhub.optim  # noqa: F401
from tests.conftest import compose_train, micro_model
from vlhub.data import RawSample, SyntheticShapes
from vlhub.registry import DATASETS, MODELS, OBJECTIVES, SCHEDULES, TRANSFORMS


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_trains_the_towers_with_a_finite_loss(name):
    torch.manual_seed(0)
    model, objective = micro_model(), OBJECTIVES.build(name)
    objective.apply_to_model(model)
    from tests.test_grad_cache import _batch

    batch = _batch(model, size=6)
    reps = objective.represent(model, batch)
    assert reps and all(v.shape[0] == 6 for v in reps.values())  # per-sample, so chunks can be cached
    parts = objective.loss(reps, model)
    assert torch.isfinite(parts["loss"]) and parts["loss"].ndim == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    parts["loss"].backward()
    with torch.no_grad():
        for p in [*model.parameters(), *objective.parameters()]:
            if p.grad is not None:
                p -= 0.1 * p.grad
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("image_tower.") for n in changed) or not objective.needs_text
    assert any(n.startswith("text_tower.") for n in changed) or not objective.needs_text


def _dataset_kwargs(name, tmp_path):
    shapes = SyntheticShapes(num_samples=4, split="val")
    cases = {
        "synthetic": lambda: {"num_samples": 4},
        "csv": lambda: {"root": str(shapes.write_csv(tmp_path / "csv"))},
        "imagefolder": lambda: {"root": str(shapes.write_imagefolder(tmp_path / "folder"))},
    }
    assert name in cases, f"dataset {name!r} is registered but has no contract case here"
    return cases[name]()


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_yields_raw_samples(name, tmp_path):
    source = DATASETS.build(name, **_dataset_kwargs(name, tmp_path))
    assert len(source) == 4
    sample = source.load(3)
    assert isinstance(sample, RawSample) and sample.caption and sample.image.mode == "RGB"


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_every_transform_makes_model_sized_tensors(name, tiny_model):
    transforms = TRANSFORMS.build(name, stats=tiny_model.image_stats)
    image = SyntheticShapes(num_samples=1).load(0).image
    size = tiny_model.image_stats.size
    assert transforms.train(image).shape == transforms.eval(image).shape == (3, size, size)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_warms_up_and_stays_in_range(name):
    factors = [SCHEDULES.get(name)(step, warmup_steps=10, max_steps=100) for step in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(0.0 <= f <= 1.0 for f in factors)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builder_makes_a_two_tower_model(name):
    model = MODELS.build(name, config=dict(compose_train().model.config))
    images = torch.zeros(2, 3, model.image_stats.size, model.image_stats.size)
    assert model.encode_image(images).shape == model.encode_text(model.tokenize(["a", "b"])).shape
