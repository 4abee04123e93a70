"""Which parameters receive gradients under each locking setting (LiT and text locking)."""

import pytest
import torch

from tests.helpers.models import timm_bn_model
from vlhub.objectives import ClipObjective


def _grads_after_one_backward(model, objective):
    images = torch.randn(4, 3, model.image_stats.size, model.image_stats.size)
    batch = {"image": images, "text": model.tokenize(["a red circle", "a blue star", "green", "a cross"])}
    model.train()
    objective.loss(objective.represent(model, batch), model)["loss"].backward()
    return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_plain_clip_trains_both_towers(tiny_model):
    got = _grads_after_one_backward(tiny_model, ClipObjective())
    assert any(n.startswith("image_tower.module.conv1") for n in got)
    assert any(n.startswith("text_tower.module.token_embedding") for n in got)
    assert "logit_scale" in got


def test_lit_locks_the_whole_image_tower(tiny_model):
    objective = ClipObjective(lock_image=True, unlocked_groups=0)
    objective.apply_to_model(tiny_model)
    got = _grads_after_one_backward(tiny_model, objective)
    assert not any(n.startswith("image_tower.") for n in got)
    assert all(not p.requires_grad for p in tiny_model.image_tower.parameters())
    assert any(n.startswith("text_tower.") for n in got) and "logit_scale" in got


def test_lit_unlocked_groups_leaves_the_last_groups_trainable(tiny_model):
    objective = ClipObjective(lock_image=True, unlocked_groups=1)
    objective.apply_to_model(tiny_model)
    got = _grads_after_one_backward(tiny_model, objective)
    image_grads = {n for n in got if n.startswith("image_tower.")}
    # open_clip's ViT groups: [conv1, class_embedding, positional_embedding, ln_pre], blocks..., [ln_post, proj]
    assert image_grads and all(("ln_post" in n) or n.endswith(".proj") for n in image_grads)
    objective_two = ClipObjective(lock_image=True, unlocked_groups=2)
    torch.manual_seed(0)
    from tests.helpers.models import micro_model

    model_two = micro_model()
    objective_two.apply_to_model(model_two)
    got_two = {n for n in _grads_after_one_backward(model_two, objective_two) if n.startswith("image_tower.")}
    last_block = "image_tower.module.transformer.resblocks.1."
    assert any(n.startswith(last_block) for n in got_two)
    assert not any(n.startswith("image_tower.module.transformer.resblocks.0.") for n in got_two)


def test_text_locking_keeps_the_last_text_layers_trainable(tiny_model):
    objective = ClipObjective(lock_text=True, text_unlocked_layers=0)
    objective.apply_to_model(tiny_model)
    got = _grads_after_one_backward(tiny_model, objective)
    assert not any(n.startswith("text_tower.") for n in got)
    assert any(n.startswith("image_tower.") for n in got)


@pytest.mark.slow
def test_lit_on_a_timm_tower_locks_groups_and_freezes_locked_batchnorm():
    model = timm_bn_model()
    ClipObjective(lock_image=True, unlocked_groups=0, freeze_bn_stats=True).apply_to_model(model)
    bn_types = {type(m).__name__ for m in model.image_tower.module.trunk.modules() if "BatchNorm" in type(m).__name__}
    assert bn_types == {"FrozenBatchNorm2d"}
    got = {n for n in _grads_after_one_backward(model, ClipObjective()) if n.startswith("image_tower.")}
    assert got and all(".head." in n for n in got)  # only open_clip's projection head stays trainable

    model = timm_bn_model()
    ClipObjective(lock_image=True, unlocked_groups=1, freeze_bn_stats=True).apply_to_model(model)
    trunk = model.image_tower.module.trunk
    live_bn = [n for n, m in trunk.named_modules() if type(m).__name__ == "BatchNorm2d"]
    assert live_bn and all(n.startswith("layer4.") for n in live_bn)  # the unlocked (last) group only
    got = {n for n in _grads_after_one_backward(model, ClipObjective()) if n.startswith("image_tower.")}
    assert any(".trunk.layer4." in n for n in got)
    assert all(".trunk.layer4." in n or ".head." in n for n in got)
