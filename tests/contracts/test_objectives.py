"""Every objective under the gradient cache, at evaluation, at launch and from a checkpoint."""

import pytest
import torch

import vlhub
from tests.helpers.configs import run_train
from tests.helpers.objectives import evaluate_on_shapes, objective_batch, prepared_objective
from tests.helpers.tensors import relative_error
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients
from vlhub.objectives import IncompatibleObjective
from vlhub.registry import OBJECTIVES

CPU = torch.device("cpu")
TEXT_CFG = "{context_length:16,vocab_size:49408,width:32,heads:2,layers:1}"
SMALL_RN50 = "{embed_dim:32,vision_cfg:{image_size:32,layers:[1,1,1,1],width:16},text_cfg:" + TEXT_CFG + "}"


def _gradients(model, objective, batch, strategy) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    strategy(model, objective, batch, Precision("fp32", CPU))
    named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_the_gradient_cache_gives_every_objective_its_full_batch_gradient(name):
    model, objective = prepared_objective(name)
    batch = objective_batch(model, objective, size=8)
    plain = _gradients(model, objective, batch, PlainGradients())
    cached = _gradients(model, objective, batch, GradCache(4))
    assert cached.keys() == plain.keys()
    assert any(k.startswith("objective.") for k in plain) or not list(objective.parameters())
    assert relative_error(cached, plain) <= 1e-5


@pytest.mark.parametrize(
    ("name", "expected", "absent"),
    [
        ("filip", "synthetic-zeroshot-top1", "synthetic-linear_probe-top1"),
        ("cloob", "synthetic-zeroshot-top1", "synthetic-classifier-top1"),
        ("ce", "synthetic-classifier-top1", "synthetic-zeroshot-top1"),
        ("simclr", "synthetic-linear_probe-top1", "synthetic-zeroshot-top1"),
    ],
)
def test_the_objective_decides_how_images_are_scored(name, expected, absent):
    model, objective = prepared_objective(name)
    metrics = evaluate_on_shapes(model.eval(), objective.eval())
    assert expected in metrics and absent not in metrics
    assert 0.0 <= metrics[expected] <= 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective=filip", "model=rn50"], "objective=filip with model=rn50.*needs token features"),
        (["objective=coca", "model=rn50"], "objective=coca with model=rn50.*needs token features"),
        (["objective=simclr", "augment_views=none"], "objective=simclr.*augment_views=none.*identical"),
    ],
)
def test_an_objective_that_cannot_work_fails_at_launch_naming_both(tmp_path, overrides, message):
    choices = {"model": "tiny", "data": "synthetic", "augment": "clip", "augment_views": "simclr"}
    choices.update(dict(o.split("=") for o in overrides))
    if "model=rn50" in overrides:  # a small tower of RN50's kind (a ModifiedResNet): the check reads the kind
        overrides = [*overrides, f"+model.config={SMALL_RN50}", "model.arch=null"]
    with pytest.raises(IncompatibleObjective, match=message):
        run_train(overrides, tmp_path, choices)


def test_a_checkpoint_rebuilds_the_objective_and_its_heads_through_the_registry(tmp_path):
    run_train(["objective=siglip"], tmp_path, {"model": "tiny", "objective": "siglip"})
    path = tmp_path / "checkpoints/latest.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["objective_spec"]["name"] == "siglip"
    assert "_target_" not in checkpoint["objective_spec"]["kwargs"]
    loaded = vlhub.load(path)
    model, preprocess, tokenizer = loaded  # still unpacks as three
    assert type(loaded.objective).__name__ == "SiglipObjective"
    torch.testing.assert_close(loaded.objective.logit_bias.detach(), checkpoint["objective"]["logit_bias"])
    assert loaded.objective.logit_bias.item() != -10.0  # trained, not re-initialised


# Which loss parts each view moves: image-text terms read the base view only, SSL terms the strong ones.
CLIP_PARTS = {"contrastive_loss", "image_to_text_loss", "text_to_image_loss"}
VIEW_READERS = {
    "slip": (CLIP_PARTS, {"ssl_loss"}, {}),
    "declip": (
        CLIP_PARTS,
        {"ssl_loss", "multiview_loss", "nn_loss"},
        {"ssl_projection_dim": 8, "ssl_hidden_dim": 16, "queue_size": 16},
    ),
    "simclr": (set(), {"ssl_loss"}, {}),
}


@pytest.mark.parametrize("name", list(VIEW_READERS))
def test_image_text_terms_see_the_base_view_and_ssl_terms_the_strong_views(name):
    base_parts, strong_parts, kwargs = VIEW_READERS[name]
    model, objective = prepared_objective(name, **kwargs)
    batch = objective_batch(model, objective, size=8)
    objective.train()
    if getattr(objective, "text_queue", None) is not None:  # DeCLIP: neighbours in the queue
        objective.text_queue.push(torch.randn(16, model.embed_dim, generator=torch.Generator().manual_seed(0)))

    def parts(batch):
        with torch.no_grad():
            out = objective.loss(objective.represent(model, batch), model)
        return {key: value for key, value in out.items() if key.endswith("_loss")}

    before = parts(batch)
    assert base_parts | strong_parts <= set(before)
    for key, movers in (("image", base_parts), ("image_view2", strong_parts), ("image_view3", strong_parts)):
        after = parts({**batch, key: batch[key].roll(1, dims=0)})  # pairs broken in this view only
        moved = {part for part in before if not torch.equal(before[part], after[part])}
        assert moved == movers, (key, moved)
    if name == "slip":  # the SSL head reads the image tower's features before its projection
        with torch.no_grad():
            proj = model.image_tower.module.proj
            proj.add_(0.1 * torch.randn(proj.shape, generator=torch.Generator().manual_seed(0)))
        moved = {part for part, value in parts(batch).items() if not torch.equal(before[part], value)}
        assert moved == CLIP_PARTS
