"""Tower options that trade compute for memory: model.grad_checkpointing (the same gradients, with the
gradient cache too) and model.patch_dropout (by key on open_clip's and timm's ViTs)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.configs import compose_train
from tests.helpers.models import TINY_TEXT, micro_model
from tests.helpers.objectives import gradients, objective_batch
from tests.helpers.tensors import relative_error
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients
from vlhub.models import build_open_clip_model
from vlhub.objectives import ClipObjective

FP32 = Precision("fp32", torch.device("cpu"))


def test_grad_checkpointing_gives_the_same_gradients():
    objective = ClipObjective()
    plain, checkpointed = micro_model(seed=0), micro_model(seed=0, grad_checkpointing=True)
    assert checkpointed.image_tower.module.transformer.grad_checkpointing
    assert checkpointed.text_tower.module.transformer.grad_checkpointing
    batch = objective_batch(plain, objective, 8)
    expected, _ = gradients(plain, objective, batch, PlainGradients())
    got, _ = gradients(checkpointed, objective, batch, PlainGradients())
    assert relative_error(got, expected) <= 1e-6
    cached, _ = gradients(checkpointed, objective, batch, GradCache(4))  # composes with the gradient cache
    assert relative_error(cached, expected) <= 1e-5


def test_grad_checkpointing_on_a_timm_trunk():
    model = build_open_clip_model(
        config={"embed_dim": 32, "vision_cfg": {"image_size": 32}, "text_cfg": TINY_TEXT},
        timm_backbone="test_vit",
        grad_checkpointing=True,
    )
    assert model.image_tower.module.trunk.grad_checkpointing is True


@pytest.mark.parametrize("arch", ["vit_b32", "vit_b16"])
def test_patch_dropout_by_key_on_named_vits(arch):
    from hydra.utils import instantiate
    from open_clip.transformer import PatchDropout

    cfg = compose_train([f"model={arch}", "model.patch_dropout=0.5", "+model.image_size=64"])
    with torch.device("meta"):  # the modules and shapes without the seconds of initialising ViT-B weights
        model = instantiate(cfg.model)
    dropout = model.image_tower.module.patch_dropout
    assert isinstance(dropout, PatchDropout) and dropout.prob == 0.5
    # One forward at 64 px: half of the patches (not the class token) reach the transformer.
    seen = {}
    handle = model.image_tower.module.transformer.register_forward_pre_hook(
        lambda module, args: seen.update(tokens=args[0].shape[1])
    )
    model.train()
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 64, 64, device="meta"))
    handle.remove()
    patches = (64 // model.image_tower.module.patch_size[0]) ** 2
    assert seen["tokens"] == 1 + patches // 2


def test_patch_dropout_by_key_on_a_timm_vit():
    from hydra.utils import instantiate
    from timm.layers import PatchDropout

    timm_vit = ["model=timm", "model.timm_backbone=test_vit", "model.patch_dropout=0.25", "model.image_size=32"]
    cfg = compose_train(timm_vit)
    model = instantiate(cfg.model)
    trunk = model.image_tower.module.trunk
    assert isinstance(trunk.patch_drop, PatchDropout) and trunk.patch_drop.prob == 0.25
    model.train()
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, model.embed_dim)
