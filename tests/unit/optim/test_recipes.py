"""Optimizer recipes: per-tower lr and weight decay, layer-wise lr decay, LAMB, lr per group in TensorBoard."""

import pytest
import torch
from hydra.utils import instantiate

from tests.helpers.configs import compose_train
from tests.helpers.objectives import objective_batch, prepared_objective
from vlhub.config_keys import build_at
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients, train_step
from vlhub.models import build_open_clip_model

CONSTANT = ["optim.warmup_steps=0", "optim.scheduler=constant"]


def recipe(overrides: list[str]):
    return build_at(compose_train([*CONSTANT, *overrides]), "optim")  # as the commands build it


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
    with torch.device("meta"):  # 151M parameters: their names and shapes are what the groups need (no init)
        model = instantiate(compose_train(["model=vit_b32"]).model)
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
