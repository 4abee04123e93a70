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
from tests.helpers.configs import compose_train
from tests.helpers.objectives import objective_batch, prepared_objective
from vlhub.data import RawSample, SyntheticShapes
from vlhub.objectives import ContrastiveObjective
from vlhub.registry import CAPTION_TRANSFORMS, DATASETS, MODELS, OBJECTIVES, SCHEDULES, TRANSFORMS


def _uses_temperature(objective) -> bool:
    # Every image-text objective scales its logits by the model's temperature; cloob's is fixed (not trained).
    return objective.needs_text and objective.trains_temperature


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_trains_what_it_should_with_a_finite_loss(name):
    model, objective = prepared_objective(name)
    batch = objective_batch(model, objective, size=6)
    reps = objective.represent(model, batch)
    assert reps and all(v.shape[0] == 6 for v in reps.values())  # per-sample, so chunks can be cached
    parts = objective.loss(reps, model)
    assert torch.isfinite(parts["loss"]) and parts["loss"].ndim == 0
    parts["loss"].backward()

    def trained(module, prefix):
        return {f"{prefix}{n}" for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    image = trained(model.image_tower, "image_tower.")
    text = trained(model.text_tower, "text_tower.")
    every_image = {f"image_tower.{n}" for n, _ in model.image_tower.named_parameters()}
    every_text = {f"text_tower.{n}" for n, _ in model.text_tower.named_parameters()}
    assert image == every_image, f"untrained image parameters: {sorted(every_image - image)[:5]}"
    assert text == (every_text if objective.needs_text else set()), sorted(every_text ^ text)[:5]
    assert (model.logit_scale.grad is not None) == _uses_temperature(objective)
    own = {n for n, _ in objective.named_parameters()}
    assert trained(objective, "") == own, (
        f"objective parameters without gradient: {sorted(own - trained(objective, ''))}"
    )


@pytest.mark.parametrize("name", [n for n in OBJECTIVES.names() if issubclass(OBJECTIVES.get(n), ContrastiveObjective)])
def test_every_contrastive_objective_leaves_a_locked_image_tower_untouched(name):
    model, objective = prepared_objective(name, lock_image=True)
    batch = objective_batch(model, objective, size=4)
    objective.loss(objective.represent(model, batch), model)["loss"].backward()
    assert all(p.grad is None for p in model.image_tower.parameters())
    assert any(p.grad is not None for p in model.text_tower.parameters())


def _shards(shapes, tmp_path):
    from vlhub.data.write_shards import write_shards

    write_shards((shapes.load(i) for i in range(4)), tmp_path / "shards", shard_size=2)
    return str(tmp_path / "shards" / "shard-{000000..000001}.tar")


def _dataset_kwargs(name, tmp_path):
    shapes = SyntheticShapes(num_samples=4, split="val")
    cases = {
        "synthetic": lambda: {"num_samples": 4},
        "csv": lambda: {"root": str(shapes.write_csv(tmp_path / "csv"))},
        "imagefolder": lambda: {"root": str(shapes.write_imagefolder(tmp_path / "folder"))},
        "wds": lambda: {"root": _shards(shapes, tmp_path)},
        "blend": lambda: {"schema": _schema(_shards(shapes, tmp_path), tmp_path)},
    }
    assert name in cases, f"dataset {name!r} is registered but has no contract case here"
    return cases[name]()


def _schema(root, tmp_path):
    path = tmp_path / "blend.yaml"
    path.write_text(f"sources:\n  - {{name: a, root: '{root}', num_samples: 4, weight: 1}}\n")
    return str(path)


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_yields_raw_samples_and_batches(name, tmp_path):
    source = DATASETS.build(name, **_dataset_kwargs(name, tmp_path))
    assert len(source) == 4
    if hasattr(source, "load"):  # map-style
        sample = source.load(3)
        assert isinstance(sample, RawSample) and sample.caption and sample.image.mode == "RGB"
    loaded = next(iter(source.build_loader(lambda image: torch.zeros(3, *image.size), None, 4, seed=0)))
    assert loaded.bad_samples == 0 and loaded.samples_read == 4
    assert loaded.batch["image"].shape[0] == 4 and all(loaded.batch["text_raw"])
    assert loaded.batch["sample_id"].tolist() == [0, 1, 2, 3]  # the global positions of the first batch


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_every_transform_makes_model_sized_tensors(name, tiny_model):
    transforms = TRANSFORMS.build(name, stats=tiny_model.image_stats)
    image = SyntheticShapes(num_samples=1).load(0).image
    size = tiny_model.image_stats.size
    assert transforms.train(image).shape == transforms.eval(image).shape == (3, size, size)


def _caption_transform_keys(name):
    cases = {"shift_cipher": {"k": 3}, "token_trunc": {"k": 4}}
    simple = {"clean", "simple", "word_scramble", "token_scramble", "token_strip"}
    assert name in cases or name in simple, f"caption transform {name!r} is registered but has no contract case here"
    return cases.get(name, {})


@pytest.mark.parametrize("name", CAPTION_TRANSFORMS.names())
def test_every_caption_transform_is_seeded_and_keeps_token_rows_valid(name):
    from open_clip.tokenizer import SimpleTokenizer

    from vlhub.data.captions import CaptionPipeline

    tokenizer = SimpleTokenizer(context_length=16)
    pipeline = CaptionPipeline([{"name": name, **_caption_transform_keys(name)}], [["red circle"], ["blue square"]])
    caption = "A small red circle next to a <b>blue square</b> on a grey background"
    prepared = pipeline.prepare(caption, seed=3)
    assert prepared is not None and prepared == pipeline.prepare(caption, seed=3)  # a function of the seed
    tokens = pipeline.collate([prepared], tokenizer)["text"]
    plain = tokenizer([prepared.text])
    assert tokens.shape == plain.shape and tokens.dtype == plain.dtype
    row, original = tokens[0].tolist(), plain[0].tolist()
    end = row.index(49407)  # SOT first, EOT right after the content, padding after it
    assert row[0] == 49406 and set(row[end + 1 :]) <= {0}
    content, left = row[1:end], original[1 : original.index(49407)]
    assert all(content.count(token) <= left.count(token) for token in content)  # tokens move or go, never appear


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
