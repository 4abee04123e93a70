"""The gradient cache gives the full-batch gradient (SPEC section 4)."""

import pytest
import torch

from tests.helpers.models import micro_model
from tests.helpers.objectives import RecordingClip, gradients
from tests.helpers.tensors import relative_error
from vlhub.data import SyntheticShapes, build_train_loader
from vlhub.data.batch import move_batch
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.step import PlainGradients
from vlhub.objectives import ClipObjective

CPU = torch.device("cpu")


def _loader_batch(model, size=32, seed=0):
    """A batch as the training loader gives it: uint8 images, normalised on the device later."""
    from vlhub.augment import build_clip_transforms

    transforms = build_clip_transforms(model.image_stats)
    loader = build_train_loader(SyntheticShapes(num_samples=256), transforms.train, model.tokenizer, size, seed)
    return next(iter(loader)).batch


def _batch(model, size=32, seed=0):
    """A batch ready for ``represent``: images normalised with the model's stats."""
    stats = model.image_stats
    return move_batch(_loader_batch(model, size, seed), CPU, None, stats.mean, stats.std)


@pytest.mark.parametrize("chunk_size", [4, 8, 16, 32])
def test_cached_gradient_equals_the_full_batch_gradient(chunk_size):
    torch.manual_seed(0)
    model, objective = micro_model(), ClipObjective()
    batch = _loader_batch(model)  # uint8: each strategy normalises on the device (chunks prefetched)
    plain, plain_parts = gradients(model, objective, batch, PlainGradients())
    cached, cached_parts = gradients(model, objective, batch, GradCache(chunk_size))
    assert cached.keys() == plain.keys() and "logit_scale" in plain
    assert relative_error(cached, plain) <= 1e-5
    # The temperature's gradient is counted once, not once per chunk.
    torch.testing.assert_close(cached["logit_scale"], plain["logit_scale"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(cached_parts["loss"], plain_parts["loss"])


@pytest.mark.parametrize("short_by", [1, 7, 24])
def test_a_short_batch_is_cut_into_as_many_chunks_as_a_full_one(short_by):
    """A batch short of samples (bad ones skipped) keeps the step's chunk count, so every rank runs
    as many forwards (collectives under FSDP2); the gradient is unchanged. Below one sample per
    chunk the trainer skips the step on every rank."""
    torch.manual_seed(0)
    model, objective = micro_model(), ClipObjective()
    batch = {k: v[: 32 - short_by] for k, v in _loader_batch(model).items()}
    strategy = GradCache(4, chunks_per_step=8)
    assert len(strategy.chunks(batch)) == 8
    assert sum(len(chunk["image"]) for chunk in strategy.chunks(batch)) == 32 - short_by
    plain, _ = gradients(model, objective, batch, PlainGradients())
    cached, _ = gradients(model, objective, batch, strategy)
    assert cached.keys() == plain.keys() and relative_error(cached, plain) <= 1e-5
    assert strategy.min_samples == 8 and PlainGradients.min_samples == 1


def test_with_stochastic_layers_each_replay_reproduces_its_first_pass():
    torch.manual_seed(0)
    from tests.helpers.configs import compose_train
    from vlhub.models import build_open_clip_model

    config = dict(compose_train().model.config)
    config["vision_cfg"] = {**config["vision_cfg"], "patch_dropout": 0.5}
    model = build_open_clip_model(config=config)
    model.train()
    objective = RecordingClip()
    batch = _batch(model, size=24)
    gradients(model, objective, batch, GradCache(8))
    first, replays = objective.seen[:3], objective.seen[3:]
    assert len(replays) == 3
    for a, b in zip(first, replays):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert not torch.equal(first[0]["image_features"], first[1]["image_features"][: len(first[0]["image_features"])])
    # Randomness is live: the same chunk drawn again without replay gives other features.
    again = objective.represent(model, {k: v[:8] for k, v in batch.items()})
    assert not torch.equal(again["image_features"], first[0]["image_features"])


def test_amp_fp16_step_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    model, objective = micro_model(), ClipObjective()
    batch = _batch(model, size=16)
    reference, _ = gradients(model, objective, batch, PlainGradients())
    half, parts = gradients(model, objective, batch, GradCache(8), precision="amp_fp16")
    assert torch.isfinite(parts["loss"]) and all(torch.isfinite(g).all() for g in half.values())
    assert relative_error(half, reference) < 2e-2


def test_batchnorm_running_stats_update_once_per_chunk():
    from tests.helpers.models import timm_bn_model

    cached_model, reference = timm_bn_model(), timm_bn_model()
    batch = _batch(cached_model, size=16)
    gradients(cached_model, ClipObjective(), batch, GradCache(8))
    with torch.no_grad():  # gradient accumulation's statistics: one forward per chunk
        for start in (0, 8):
            reference.encode_image(batch["image"][start : start + 8])
    ours = dict(cached_model.named_buffers())
    for name, value in reference.named_buffers():
        if "running_mean" in name or "num_batches_tracked" in name:
            torch.testing.assert_close(ours[name], value)
