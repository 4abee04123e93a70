"""Token features of timm ViT image towers (patch tokens only, projected like the pooled path), and the
token-level objectives (FILIP, CoCa) training on them: a tiny timm ViT and a tiny timm EVA02 here,
``model=eva02_b16`` behind VLHUB_LONG_TESTS=1."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from timm.models import register_model

from tests.helpers.models import TINY_TEXT, timm_bn_model
from tests.helpers.objectives import objective_batch
from tests.helpers.tensors import relative_error
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients
from vlhub.models import build_open_clip_model
from vlhub.objectives import IncompatibleObjective
from vlhub.registry import OBJECTIVES

CPU = torch.device("cpu")
SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}  # 16 patches
# The prefix tokens each tiny trunk carries, written out: a class token (+ 2 registers for the ViT).
PREFIX = {"vit": 3, "eva02": 1}


def _timm_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


if "vlhub_test_tiny_vit" not in timm.list_models("vlhub_test_*"):

    @register_model
    def vlhub_test_tiny_vit(pretrained: bool = False, **kwargs):
        # fc_norm=False: the final norm before pooling, so the mean of the projected patch tokens is the
        # pooled feature, an independent check of which tokens are kept.
        kw = {**SMALL, "reg_tokens": 2, "fc_norm": False, **_timm_kwargs(kwargs)}
        return timm.create_model("vit_tiny_patch16_224", **kw)

    @register_model
    def vlhub_test_tiny_eva02(pretrained: bool = False, **kwargs):
        return timm.create_model("eva02_tiny_patch14_224", **SMALL, **_timm_kwargs(kwargs))


def _model(kind: str):
    """A two-tower model whose image tower is a tiny timm trunk: ``model=timm``'s layout for the ViT
    (avg pool, open_clip's linear head), ``model=eva02_b16``'s for the EVA02 (token pool, timm's head)."""
    torch.manual_seed(0)
    if kind == "vit":
        config = {"embed_dim": 32, "vision_cfg": {"image_size": 32}, "text_cfg": TINY_TEXT}
        return build_open_clip_model(config=config, timm_backbone="vlhub_test_tiny_vit")
    vision = {"image_size": 32, "timm_model_name": "vlhub_test_tiny_eva02", "timm_pool": "token", "timm_proj": None}
    return build_open_clip_model(config={"embed_dim": 32, "vision_cfg": vision, "text_cfg": TINY_TEXT})


@pytest.mark.parametrize("kind", ["vit", "eva02"])
def test_timm_vit_tokens_are_the_patch_tokens_projected_like_the_pooled_path(kind):
    model = _model(kind).eval()
    tower, visual = model.image_tower, model.image_tower.module
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tower(images, output_tokens=True)
        features = visual.trunk.forward_features(images)
        patches = features[:, PREFIX[kind] :]
        expected = visual.head(visual.trunk.head(visual.trunk.fc_norm(patches)))
        pooled = visual(images)
    assert tower.has_tokens and tower.token_dim == model.embed_dim == out.tokens.shape[-1]
    assert out.tokens.shape[:2] == (2, 16) and out.token_mask.all()
    torch.testing.assert_close(out.tokens, expected)
    torch.testing.assert_close(out.pooled, pooled)  # one trunk pass gives open_clip's pooled features too
    if kind == "vit":  # avg pool then a linear head: the pooled feature is the mean of the patch tokens
        torch.testing.assert_close(out.tokens.mean(dim=1), pooled, rtol=1e-5, atol=1e-6)


def _gradients(model, objective, batch, strategy) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    parts = strategy(model, objective, batch, Precision("fp32", CPU))
    named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}, parts


def _train_two_steps_with_cache_equal_to_plain(model, objective, batch_size: int, chunk: int, lr: float = 1e-3) -> None:
    objective.apply_to_model(model)
    batch = objective_batch(model, objective, size=batch_size)
    cached, _ = _gradients(model, objective, batch, GradCache(chunk))
    plain, parts = _gradients(model, objective, batch, PlainGradients())
    assert cached.keys() == plain.keys() and any(k.startswith("image_tower.module.trunk.blocks") for k in plain)
    assert relative_error(cached, plain) <= 1e-5
    trunk = {n: p.detach().clone() for n, p in model.image_tower.module.trunk.named_parameters()}
    optimizer = torch.optim.AdamW([*model.parameters(), *objective.parameters()], lr=lr)
    losses = [parts["loss"].item()]
    for _ in range(2):  # two steps on the plain gradient of one fixed batch: the loss falls
        optimizer.step()
        _, parts = _gradients(model, objective, batch, PlainGradients())
        losses.append(parts["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[0]
    moved = [n for n, p in model.image_tower.module.trunk.named_parameters() if not torch.equal(p, trunk[n])]
    assert any(".blocks.0." in f".{n}" for n in moved)


@pytest.mark.parametrize("kind", ["vit", "eva02"])
@pytest.mark.parametrize("name", ["filip", "coca"])
def test_filip_and_coca_train_on_timm_vits_with_the_cached_gradient_equal_to_the_plain_one(name, kind):
    kwargs = {"decoder_layers": 1, "decoder_heads": 4} if name == "coca" else {}
    model, objective = _model(kind), OBJECTIVES.build(name, **kwargs)
    _train_two_steps_with_cache_equal_to_plain(model, objective, batch_size=4, chunk=2)


def test_a_timm_cnn_has_no_tokens_and_the_error_names_it_and_what_works():
    model = timm_bn_model()
    for name in ("filip", "coca"):
        with pytest.raises(IncompatibleObjective, match=r"\(TimmModel \(timm ResNet\)\) has none.*timm ViT.*eva02_b16"):
            OBJECTIVES.build(name).apply_to_model(model)


@pytest.mark.skipif(not os.environ.get("VLHUB_LONG_TESTS"), reason="EVA02-B/16 at 224 px on CPU: VLHUB_LONG_TESTS=1")
@pytest.mark.parametrize("name", ["filip", "coca"])
def test_filip_and_coca_train_on_model_eva02_b16(name):
    from hydra.utils import instantiate

    from tests.helpers.configs import compose_train

    torch.manual_seed(0)
    model = instantiate(compose_train(["model=eva02_b16"]).model)
    assert model.image_tower.has_tokens and type(model.image_tower.module.trunk).__name__ == "Eva"
    kwargs = {"decoder_layers": 1} if name == "coca" else {}
    objective = OBJECTIVES.build(name, **kwargs)
    _train_two_steps_with_cache_equal_to_plain(model, objective, batch_size=4, chunk=2, lr=1e-5)  # 1e-3 diverges
