"""The optimizer each model option's recipe builds, read from the Trainer that ``vlhub.train.train`` makes:
command-line lr and warmup win, open_clip's one-GPU values, per-tower and layer-decay groups on the
schedule, scaling with the batch only when asked, and each group's lr in TensorBoard."""

from __future__ import annotations

import copy
import functools
import logging
import math
import re

import pytest
import torch

from tests.helpers.configs import compose_train, run_train

# -- the optimizer gets what is typed; scaling with the batch only when asked -----------
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
    monkeypatch.setattr(Trainer, "fit", lambda self, run: captured.append(self) or {})
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
    (open_clip_cnn, the same values with other betas, is checked in tests/integration/test_console_and_recipes.py.)"""
    trainer = built_trainer(["model=vit_b32", "trainer.max_steps=20000"], tmp_path, monkeypatch)
    assert type(trainer.optimizer) is torch.optim.AdamW and trainer.config.batch_size == 128
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
        (
            ["optim.scale_with_batch=sqrt"],
            "optim.reference_batch_size=null: optim.scale_with_batch=sqrt needs it > 0",
        ),  # tiny's adamw: no reference
    ],
)
def test_a_scaling_rule_that_cannot_apply_fails_at_launch_naming_the_key(overrides, key, tmp_path, monkeypatch):
    with pytest.raises(Exception, match=re.escape(key)):
        built_trainer(overrides, tmp_path, monkeypatch)


def test_each_named_group_lr_is_logged_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(["optim.layer_decay=0.75", "logger.tensorboard=true", "trainer.max_steps=1", "eval=none"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/lr", "train/lr/image_block_1", "train/lr/text_embeddings", "train/lr/heads"} <= tags
    block = events.Scalars("train/lr/image_block_1")[0].value  # depth 2: block 1 at decay^1
    assert block == pytest.approx(0.75 * events.Scalars("train/lr/heads")[0].value)
