"""Optimizer recipes: per-tower lr and weight decay, layer-wise lr decay, LAMB, lr per group in TensorBoard."""

import copy
import functools
import logging
import math
import re

import pytest
import torch
from hydra.utils import instantiate

from tests.helpers.configs import compose_train, run_train
from tests.helpers.objectives import objective_batch, prepared_objective
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients, train_step
from vlhub.models import build_open_clip_model

CONSTANT = ["optim.warmup_steps=0", "optim.scheduler=constant"]


def recipe(overrides: list[str]):
    return instantiate(compose_train([*CONSTANT, *overrides]).optim)


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """id(param) -> its group; every parameter in exactly one group."""
    found: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert id(param) not in found
            found[id(param)] = group
    return found


def test_default_keys_keep_the_two_plain_groups(tiny_model):
    optimizer, _ = recipe([]).build([tiny_model], max_steps=10)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all("name" not in g and g["lr"] == 2e-3 for g in optimizer.param_groups)


def test_per_tower_lr_and_weight_decay_land_in_the_groups():
    model, objective = prepared_objective("ce")
    overrides = ["optim.image.lr=1e-4", "optim.image.weight_decay=0.05", "optim.text.lr=3e-4"]
    optimizer, _ = recipe(overrides).build([model, objective], max_steps=10)
    groups = group_of(optimizer)
    expected = {"image": (1e-4, 0.05), "text": (3e-4, 0.1)}
    for tower_name, (lr, wd) in expected.items():
        for param in getattr(model, f"{tower_name}_tower").parameters():
            group = groups[id(param)]
            assert group["name"] == tower_name and group["lr"] == lr
            assert group["weight_decay"] == (wd if param.ndim >= 2 else 0.0)
    heads = [model.logit_scale, *objective.parameters()]  # the temperature and the ce head: optim.lr / wd
    assert objective.head is not None and all(groups[id(p)]["name"] == "heads" for p in heads)
    assert groups[id(objective.head.weight)]["lr"] == 2e-3 and groups[id(objective.head.weight)]["weight_decay"] == 0.1


def _params(items: list) -> list[torch.nn.Parameter]:
    return [p for item in items for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())]


def test_layer_decay_gives_every_block_of_vit_b32_the_formula_lr():
    torch.manual_seed(0)
    model = instantiate(compose_train(["model=vit_b32"]).model)  # 151M parameters: built once, a few seconds
    optimizer, _ = recipe(["optim.layer_decay=0.75", "optim.lr=1e-3"]).build([model], max_steps=10)
    groups = group_of(optimizer)
    assert len(groups) == sum(1 for p in model.parameters() if p.requires_grad)
    image, text = model.image_tower.module, model.text_tower.module
    for tower, embeddings, final in (
        (
            image,
            [image.conv1, image.class_embedding, image.positional_embedding, image.ln_pre],
            [image.ln_post, image.proj],
        ),
        (text, [text.token_embedding, text.positional_embedding], [text.ln_final, text.text_projection]),
    ):
        depth = len(tower.transformer.resblocks)
        assert depth == 12
        for i, block in enumerate(tower.transformer.resblocks):
            assert {groups[id(p)]["lr"] for p in block.parameters()} == {1e-3 * 0.75 ** (depth - i)}
        params = [
            p for item in embeddings for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())
        ]
        assert {groups[id(p)]["lr"] for p in params} == {1e-3 * 0.75 ** (depth + 1)}
        params = [p for item in final for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())]
        assert {groups[id(p)]["lr"] for p in params} == {1e-3}
    assert groups[id(model.logit_scale)]["lr"] == 1e-3 and groups[id(model.logit_scale)]["name"] == "heads"
    assert groups[id(image.transformer.resblocks[3].mlp.c_fc.weight)]["name"] == "image_block_3"


def test_layer_decay_on_one_tower_keeps_the_other_flat(tiny_model):
    overrides = ["optim.layer_decay=0.5", "optim.layer_decay_towers=[text]", "optim.image.lr=1e-4"]
    optimizer, _ = recipe(overrides).build([tiny_model], max_steps=10)
    groups = group_of(optimizer)
    assert {groups[id(p)]["lr"] for p in tiny_model.image_tower.parameters()} == {1e-4}
    first_block = tiny_model.text_tower.module.transformer.resblocks[0]  # depth 1: decay^1
    assert {groups[id(p)]["lr"] for p in first_block.parameters()} == {2e-3 * 0.5}


def tiny_resnet_model():
    """open_clip's ModifiedResNet (RN50's image tower) at toy size: a tower without transformer blocks."""
    return build_open_clip_model(
        config={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }
    )


@pytest.mark.parametrize("value", ["0", "1.5", "-0.75"])
def test_layer_decay_outside_0_1_fails_at_launch(value):
    with pytest.raises(Exception, match=r"optim.layer_decay must be in \(0, 1\]"):
        recipe([f"optim.layer_decay={value}"])


def test_layer_decay_on_a_tower_without_blocks_fails_naming_it():
    model = tiny_resnet_model()
    with pytest.raises(ValueError, match="image tower \\(ModifiedResNet\\) has no transformer blocks"):
        recipe(["optim.layer_decay=0.75"]).build([model], max_steps=10)
    optimizer, _ = recipe(["optim.layer_decay=0.75", "optim.layer_decay_towers=[text]"]).build([model], 10)
    assert any(g["name"] == "text_block_0" for g in optimizer.param_groups)


def test_lamb_trains_the_tiny_model_on_a_fixed_batch():
    model, objective = prepared_objective("clip")
    batch = objective_batch(model, objective, size=16)
    lamb = recipe(["optim=lamb", "optim.lr=1e-3", "optim.weight_decay=0.0"])
    optimizer, scheduler = lamb.build([model, objective], max_steps=100)
    assert type(optimizer).__module__.startswith("timm.optim")
    precision = Precision("fp32", torch.device("cpu"))
    losses = [
        float(train_step(model, objective, batch, optimizer, scheduler, precision, PlainGradients(), None)["loss"])
        for _ in range(20)
    ]
    assert losses[-1] < 0.5 * losses[0]


def test_each_named_group_lr_is_logged_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(["optim.layer_decay=0.75", "logger.tensorboard=true", "trainer.max_steps=1", "eval=none"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/lr", "train/lr/image_block_1", "train/lr/text_embeddings", "train/lr/heads"} <= tags
    block = events.Scalars("train/lr/image_block_1")[0].value  # depth 2: block 1 at decay^1
    assert block == pytest.approx(0.75 * events.Scalars("train/lr/heads")[0].value)


def test_layer_decay_on_a_timm_vit_trunk_uses_its_blocks_and_stem():
    """The EVA02 path (open_clip's TimmModel around a timm ViT), on timm's tiny test ViT."""
    torch.manual_seed(0)
    model = build_open_clip_model(
        config={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        timm_backbone="test_vit",
    )
    optimizer, _ = recipe(["optim.layer_decay=0.5", "optim.lr=1e-3"]).build([model], max_steps=10)
    groups = group_of(optimizer)
    trunk = model.image_tower.module.trunk
    depth = len(trunk.blocks)
    for i, block in enumerate(trunk.blocks):
        assert {groups[id(p)]["lr"] for p in block.parameters()} == {1e-3 * 0.5 ** (depth - i)}
    assert {groups[id(p)]["lr"] for p in _params([trunk.cls_token, trunk.pos_embed, trunk.patch_embed])} == {
        1e-3 * 0.5 ** (depth + 1)
    }
    assert {groups[id(p)]["lr"] for p in _params([trunk.norm, model.image_tower.module.head])} == {1e-3}


# -- issue 17.1: the optimizer gets what is typed; scaling with the batch only when asked -----------
# Each case runs vlhub.train.train on the composed config (the real recipe selection, instantiate and
# Trainer.build path) up to the Trainer's first step, then steps the schedule and reads the optimizer.
# The model option picks the recipe; its towers are swapped for the tiny ones (the recipe stays).


@functools.cache
def tiny_model_node():
    return compose_train().model


def built_trainer(overrides: list[str], tmp_path, monkeypatch):
    import vlhub.train
    from vlhub.engine.trainer import Trainer

    captured = []
    monkeypatch.setattr(Trainer, "fit", lambda self: captured.append(self) or {})
    cfg = compose_train(["data.workers=0", "eval=none", "logger.tensorboard=false", *overrides])
    cfg.model = copy.deepcopy(tiny_model_node())  # tiny towers; cfg.optim is what the model option selected
    vlhub.train.train(cfg, tmp_path, {})
    return captured[0]


def lrs_at(trainer, steps: list[int]) -> dict[int, dict[str, float]]:
    """{step: {group name: lr}} after ``step`` scheduler steps (as the trainer takes them)."""
    found, done = {}, 0
    trainer.optimizer.step()  # no gradients: no update; the order torch expects before scheduler.step
    for step in sorted(steps):
        for _ in range(step - done):
            trainer.scheduler.step()
        done = step
        found[step] = {g.get("name", str(i)): g["lr"] for i, g in enumerate(trainer.optimizer.param_groups)}
    return found


def cosine(step: int, warmup: int, total: int) -> float:
    """The schedule by hand: linear warmup to 1 at step warmup - 1, then half a cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def assert_lrs(found: dict[int, dict[str, float]], peak: dict[str, float], warmup: int, total: int) -> None:
    for step, lrs in found.items():
        assert lrs.keys() == peak.keys()
        for name, lr in lrs.items():
            assert lr == pytest.approx(peak[name] * cosine(step, warmup, total), rel=1e-9), (step, name)


def test_command_line_lr_and_warmup_reach_the_optimizer_on_a_model_with_a_recipe(tmp_path, monkeypatch):
    """The issue's case: it trained at 8.8e-5 with 5,657 warmup steps instead of 1e-3 and 500."""
    overrides = ["model=vit_b32", "optim.lr=1e-3", "optim.warmup_steps=500", "trainer.batch_size=256"]
    trainer = built_trainer([*overrides, "trainer.max_steps=1100"], tmp_path, monkeypatch)
    found = lrs_at(trainer, [0, 499, 800])
    assert found[0]["0"] == pytest.approx(1e-3 / 500) and found[499]["0"] == pytest.approx(1e-3)
    assert found[800]["0"] == pytest.approx(5e-4)  # half-way down the cosine: (800 - 500) / (1100 - 500)
    assert_lrs(found, {"0": 1e-3, "1": 1e-3}, warmup=500, total=1100)


def test_a_models_recipe_trains_at_open_clips_one_gpu_values(tmp_path, monkeypatch, caplog):
    """open_clip's README example (batch 128, lr 1e-3, wd 0.1, 10,000 warmup steps) as given at batch 128.
    (open_clip_cnn, the same values with other betas, is checked in tests/test_trust_output.py.)"""
    trainer = built_trainer(["model=vit_b32", "trainer.max_steps=20000"], tmp_path, monkeypatch)
    assert type(trainer.optimizer) is torch.optim.AdamW and trainer.batch_size == 128
    group = trainer.optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.98), 1e-6, 0.1)
    assert_lrs(lrs_at(trainer, [0, 9999, 15000]), {"0": 1e-3, "1": 1e-3}, warmup=10000, total=20000)
    assert "scale_with_batch" not in caplog.text and "never peaks" not in caplog.text


def test_warmup_longer_than_the_run_warns_and_is_kept(tmp_path, monkeypatch, caplog):
    # 10,000 warmup steps in the 1,100-step default run; batch 32, below the recipe's 128: nothing rescaled
    trainer = built_trainer(["model=vit_b32", "trainer.batch_size=32"], tmp_path, monkeypatch)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "warmup" in r.getMessage()]
    assert [r.getMessage() for r in warned] == ["optim: 10000 warmup steps in a 1100-step run: the lr never peaks"]
    assert lrs_at(trainer, [1099])[1099]["0"] == pytest.approx(1e-3 * 1100 / 10000)


LAYERED = ["optim.lr=1e-3", "optim.image.lr=4e-4", "optim.layer_decay=0.5", "optim.warmup_steps=10"]
# The tiny towers: image depth 2, text depth 1; block i of L at decay^(L - i), embeddings decay^(L + 1).
LAYERED_PEAKS = {
    "image_embeddings": 4e-4 / 8,
    "image_block_0": 4e-4 / 4,
    "image_block_1": 4e-4 / 2,
    "image_final": 4e-4,
    "text_embeddings": 1e-3 / 4,
    "text_block_0": 1e-3 / 2,
    "text_final": 1e-3,
    "heads": 1e-3,
}


def test_per_tower_and_layer_decay_groups_follow_the_schedule(tmp_path, monkeypatch):
    trainer = built_trainer(["model=vit_b32", *LAYERED, "trainer.max_steps=30"], tmp_path, monkeypatch)
    assert_lrs(lrs_at(trainer, [0, 9, 20]), LAYERED_PEAKS, warmup=10, total=30)


@pytest.mark.parametrize(
    ("rule", "batch", "factor"),
    [("sqrt", 512, 2.0), ("linear", 32, 0.25)],  # sqrt(512 / 128); 32 / 128
)
def test_scaling_with_the_batch_when_asked_scales_every_lr_and_not_the_warmup(
    rule, batch, factor, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="vlhub.optim")
    overrides = ["model=vit_b32", *LAYERED, f"optim.scale_with_batch={rule}", f"trainer.batch_size={batch}"]
    trainer = built_trainer([*overrides, "trainer.max_steps=30"], tmp_path, monkeypatch)
    peaks = {name: lr * factor for name, lr in LAYERED_PEAKS.items()}
    assert_lrs(lrs_at(trainer, [0, 9, 20]), peaks, warmup=10, total=30)
    line = f"optim.scale_with_batch={rule}: lr 0.001 at reference batch 128 -> lr {1e-3 * factor:.4g} at global batch"
    assert f"{line} {batch} (optim.warmup_steps=10, unscaled)" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model=vit_b32", "optim.scale_with_batch=cubic"], "optim.scale_with_batch='cubic' is not a rule"),
        (["optim.scale_with_batch=sqrt"], "needs optim.reference_batch_size > 0"),  # tiny's adamw: no reference
    ],
)
def test_a_scaling_rule_that_cannot_apply_fails_at_launch_naming_the_key(overrides, key, tmp_path, monkeypatch):
    with pytest.raises(Exception, match=re.escape(key)):
        built_trainer(overrides, tmp_path, monkeypatch)
