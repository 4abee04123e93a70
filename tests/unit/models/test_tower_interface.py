"""The Tower interface on every wrapped module kind: blocks in forward order, embeddings, gradient
checkpointing that changes nothing numerically, patch dropout, token features, the routed DDP call,
and the checkpoint layout.

References are independent of the code under test: the block class counted in the module tree and
the order in which forward hooks fire; the parameters a loss on the first block's input reaches;
the same tower run without checkpointing; open_clip's own model built from the stored config.
"""

from __future__ import annotations

import copy
import re

import open_clip
import pytest
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.modified_resnet import Bottleneck
from open_clip.transformer import ResidualAttentionBlock
from timm.models.vision_transformer import Block as TimmBlock
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from tests.helpers.configs import REPO
from tests.helpers.models import micro_model, timm_bn_model
from vlhub.models import OpenClipTextTower, build_open_clip_model

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def _timm_vit():
    torch.manual_seed(0)
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32}, "text_cfg": TEXT_CFG}
    return build_open_clip_model(config=cfg, timm_backbone="test_vit")


def _resnet():
    torch.manual_seed(0)
    vision = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}
    return build_open_clip_model(config={"embed_dim": 32, "vision_cfg": vision, "text_cfg": TEXT_CFG})


def _hf_text() -> OpenClipTextTower:
    """open_clip's HFTextEncoder around a two-layer BERT built from a config (no download), dropout off."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return OpenClipTextTower(HFTextEncoder("bert", 24, config=config, proj_type="linear"), 24)


@pytest.fixture(scope="module")
def vit():
    """The tiny default model (open_clip ViT and text transformer); tests change deep copies only."""
    return micro_model()


@pytest.fixture(scope="module")
def towers(vit):
    """Kind -> (tower, its inputs, the class of its blocks, or None for a convolutional tower)."""
    timm_vit, resnet, timm_cnn = _timm_vit(), _resnet(), timm_bn_model()
    text = vit.tokenize(["a red star", "a small blue circle"])
    images = torch.randn(2, 3, 32, 32)
    return {
        "open_clip_vit": (vit.image_tower, images, ResidualAttentionBlock),
        "open_clip_text": (vit.text_tower, text, ResidualAttentionBlock),
        "timm_vit": (timm_vit.image_tower, images, TimmBlock),
        "open_clip_resnet": (resnet.image_tower, images, None),
        "timm_cnn": (timm_cnn.image_tower, images, None),
        "hf_text": (_hf_text(), torch.tensor([[2, 5, 9, 3, 0, 0], [2, 7, 8, 11, 4, 3]]), BertLayer),
    }


KINDS = ["open_clip_vit", "open_clip_text", "timm_vit", "open_clip_resnet", "timm_cnn", "hf_text"]
WITH_BLOCKS = [k for k in KINDS if k not in ("open_clip_resnet", "timm_cnn")]


def _blocks_in_call_order(tower, inputs, blocks) -> list[int]:
    """Indices (into ``blocks``) in the order their forwards ran during one tower call."""
    order: list[int] = []
    hooks = [b.register_forward_hook(lambda *_, i=i: order.append(i)) for i, b in enumerate(blocks)]
    try:
        tower(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return order


@pytest.mark.parametrize("kind", KINDS)
def test_the_blocks_a_tower_reports_are_its_blocks_in_forward_order(towers, kind):
    tower, inputs, block_class = towers[kind]
    blocks = tower.blocks()
    if block_class is None:  # convolutional: no transformer blocks (FSDP and layer decay refuse it)
        assert blocks == [] and not any(isinstance(m, ResidualAttentionBlock | TimmBlock) for m in tower.modules())
        if kind == "open_clip_resnet":
            assert any(isinstance(m, Bottleneck) for m in tower.modules())
        return
    found = [m for m in tower.module.modules() if isinstance(m, block_class)]
    assert len(blocks) == len(found) > 0 and {id(b) for b in blocks} == {id(m) for m in found}
    assert _blocks_in_call_order(tower, inputs, blocks) == list(range(len(blocks)))


@pytest.mark.parametrize("kind", WITH_BLOCKS)
def test_embeddings_are_what_reaches_the_first_block_and_the_layers_partition_the_tower(towers, kind):
    tower, inputs, _ = towers[kind]
    tower = copy.deepcopy(tower)
    first_input: list[torch.Tensor] = []
    hook = tower.blocks()[0].register_forward_pre_hook(
        lambda _, args, kwargs: first_input.append(args[0]), with_kwargs=True
    )
    tower(inputs)
    hook.remove()
    first_input[0].float().square().sum().backward()
    reached = {id(p) for p in tower.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached and {id(p) for p in tower.embedding_parameters()} == reached
    layers = [tower.embedding_parameters(), *[list(b.parameters()) for b in tower.blocks()], tower.head_parameters()]
    ids = [id(p) for layer in layers for p in layer]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in tower.parameters()}
    assert tower.head_parameters()  # final norm / projection


def _outputs_and_grads(tower, inputs):
    tower.zero_grad()
    pooled = tower(inputs).pooled
    (pooled * torch.linspace(-1, 1, pooled.numel()).reshape(pooled.shape)).sum().backward()
    return pooled.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", [*WITH_BLOCKS, "timm_cnn"])
def test_grad_checkpointing_recomputes_blocks_and_changes_nothing_numerically(towers, kind):
    tower, inputs, _ = towers[kind]
    plain, checkpointed = copy.deepcopy(tower).train(), copy.deepcopy(tower).train()
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    out, grads = _outputs_and_grads(plain, inputs)
    out_ckpt, grads_ckpt = _outputs_and_grads(checkpointed, inputs)
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    if kind != "timm_cnn":  # it is on: a layer of the first block runs again in the backward
        linear, calls = next(m for m in checkpointed.blocks()[0].modules() if type(m) is torch.nn.Linear), []
        forward = linear.forward
        linear.forward = lambda *args: calls.append(1) or forward(*args)
        _outputs_and_grads(checkpointed, inputs)
        assert len(calls) == 2
    checkpointed.set_grad_checkpointing(False)
    assert not checkpointed.grad_checkpointing


def test_a_resnet_tower_refuses_grad_checkpointing_it_would_ignore(towers):
    resnet = copy.deepcopy(towers["open_clip_resnet"][0])
    with pytest.raises(ValueError, match="ModifiedResNet does not support activation checkpointing"):
        resnet.set_grad_checkpointing(True)


def test_patch_dropout_is_reported_and_drops_patches_before_the_first_block(vit):
    model = build_open_clip_model(config=vit.checkpoint_layout().model_cfg, patch_dropout=0.5).train()
    tower = model.image_tower
    assert tower.patch_dropout == 0.5 and vit.image_tower.patch_dropout == 0.0
    lengths = []
    tower.blocks()[0].register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape))
    tower(torch.randn(2, 3, 32, 32))
    assert 1 + 8 in lengths[0]  # the class token and half of the 16 patches of 32 px / patch 8


@pytest.mark.parametrize(("kind", "final_norm"), [("open_clip_vit", "ln_post"), ("open_clip_text", "ln_final")])
def test_open_clip_tokens_are_projected_like_the_pooled_token(towers, kind, final_norm):
    tower, inputs, _ = towers[kind]
    normed = []
    hook = getattr(tower.module, final_norm).register_forward_hook(lambda *args: normed.append(args[-1]))
    try:
        out = tower(inputs, output_tokens=True)
    finally:
        hook.remove()
    projection = tower.module.proj if kind == "open_clip_vit" else tower.module.text_projection
    projected = normed[0] @ projection  # every position after the final norm, into the shared space
    rows = torch.arange(len(inputs))
    pooled_at = torch.zeros_like(rows) if kind == "open_clip_vit" else inputs.argmax(dim=-1)  # class / end token
    torch.testing.assert_close(out.pooled, projected[rows, pooled_at])
    expected = projected[:, 1:] if kind == "open_clip_vit" else projected  # the ViT's tokens leave the class one out
    torch.testing.assert_close(out.tokens, expected)
    assert tower.token_dim == out.tokens.shape[-1] == projection.shape[1]


def test_hf_text_tokens_are_projected_like_the_pooled_path_one_per_input_position(towers):
    tower, inputs, _ = towers["hf_text"]
    out = tower(inputs, output_tokens=True)
    assert tower.has_tokens and tower.token_dim == tower.output_dim == out.tokens.shape[-1] == 24
    torch.testing.assert_close(out.pooled, tower(inputs).pooled)  # open_clip's own forward
    hidden = tower.module.transformer(input_ids=inputs, attention_mask=(inputs != 0).long()).last_hidden_state
    torch.testing.assert_close(out.tokens, tower.module.proj(hidden))
    assert torch.equal(out.token_mask, inputs != 0)
    assert tower.token_embedding is tower.module.transformer.embeddings.word_embeddings


def test_the_models_forward_calls_the_routed_tower_when_gradients_are_on_and_the_bare_one_otherwise(vit):
    """vlhub.parallel.ddp's choice, with a stand-in wrapper (a real DDP needs a process group)."""
    from vlhub.parallel.ddp import GradientOnlyDDP

    model = copy.deepcopy(vit)
    keys = list(model.state_dict())
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    model.route_tower("image", GradientOnlyDDP(model.image_tower, Counting(model.image_tower)))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        bare = model(image=images)["image_features"]
    assert calls == []
    routed = model(image=images)["image_features"]
    assert calls == [1] and torch.equal(routed.detach(), bare)
    assert list(model.state_dict()) == keys  # the wrapper is not part of the model
    with pytest.raises(ValueError, match="no text tower"):
        model.text_tower = None
        model.route_tower("text", GradientOnlyDDP(model.image_tower, Counting(model.image_tower)))


def test_the_checkpoint_layout_names_weights_as_open_clip_does(vit):
    model = vit
    layout = model.checkpoint_layout()
    reference = open_clip.CustomTextCLIP(**{k: v for k, v in layout.model_cfg.items() if k != "custom_text"})
    exported = layout.to_open_clip(model.state_dict())
    text_keys = {f"text.{k}" for k in model.text_tower.module.state_dict()}
    expected = set(reference.state_dict())
    if not layout.text_prefix:  # open_clip's CLIP class keeps text weights at the top level
        expected = (expected - text_keys) | {k.removeprefix("text.") for k in text_keys}
    assert set(exported) == expected
    back = layout.from_open_clip(exported, model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


OUTSIDE_MODELS = r'getattr\([^)]*"module"|tower\.module\b|\.trunk\b|transformer\.resblocks|"resblocks"'


def test_nothing_outside_models_finds_blocks_by_attribute_path_or_unwraps_module():
    package = REPO / "vlhub"
    scanned = list(package.rglob("*.py"))
    assert len(scanned) > 50  # the package itself, not an empty folder
    offending = [
        f"{path.relative_to(package)}:{number}"
        for path in scanned
        if "models" not in path.relative_to(package).parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(OUTSIDE_MODELS, line)
    ]
    assert offending == []
