"""The Tower and VisionLanguageModel interfaces on open_clip towers."""

import pytest
import torch

from tests.helpers.models import micro_model
from vlhub.models import build_open_clip_model


def test_token_features_come_with_a_padding_mask(tiny_model):
    tokens = tiny_model.tokenize(["a red star", "a small blue circle on a dark background"])
    out = tiny_model(image=torch.randn(2, 3, 32, 32), text=tokens, output_tokens=True)
    assert out["image_tokens"].shape[:2] == out["image_token_mask"].shape == (2, 16)  # 32 px / patch 8
    assert out["image_token_mask"].all()
    assert torch.equal(out["text_token_mask"], tokens != 0)
    assert out["text_token_mask"][0].sum() < out["text_token_mask"][1].sum()  # the shorter caption pads more
    assert out["image_features"].shape == out["text_features"].shape == (2, tiny_model.embed_dim)


def test_encoders_return_unit_vectors_matching_the_raw_forward(tiny_model):
    images = torch.randn(3, 3, 32, 32)
    encoded = tiny_model.encode_image(images)
    torch.testing.assert_close(encoded.norm(dim=-1), torch.ones(3))
    raw = tiny_model(image=images)["image_features"]
    torch.testing.assert_close(encoded, torch.nn.functional.normalize(raw, dim=-1))


def test_open_clip_state_dict_round_trips(tiny_model):
    exported = tiny_model.open_clip_state_dict()
    assert "visual.conv1.weight" in exported and "token_embedding.weight" in exported  # CLIP-class layout
    torch.manual_seed(1)
    other = micro_model()
    assert not torch.equal(other.open_clip_state_dict()["visual.conv1.weight"], exported["visual.conv1.weight"])
    other.load_open_clip_state_dict(exported)
    for key, value in other.open_clip_state_dict().items():
        assert torch.equal(value, exported[key])
    with pytest.raises(KeyError, match="missing"):
        other.load_open_clip_state_dict({k: v for k, v in exported.items() if k != "logit_scale"})


def test_a_resnet_image_tower_refuses_token_features_clearly():
    model = build_open_clip_model(
        config={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }
    )
    with pytest.raises(NotImplementedError, match="ModifiedResNet does not expose token features"):
        model(image=torch.randn(1, 3, 32, 32), output_tokens=True)


def _resnet_model():
    return build_open_clip_model(
        config={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }
    )


def _timm_model(backbone):
    text = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    return build_open_clip_model(
        config={"embed_dim": 32, "vision_cfg": {"image_size": 32}, "text_cfg": text}, timm_backbone=backbone
    )


@pytest.mark.parametrize("kind", ["vit", "timm_vit", "resnet"])
def test_image_towers_give_their_features_before_the_projection(kind):
    torch.manual_seed(0)
    model = {"vit": micro_model, "timm_vit": lambda: _timm_model("test_vit"), "resnet": _resnet_model}[kind]()
    model.eval()
    tower, images = model.image_tower, torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = model(image=images, image_unprojected=True)["image_features"]
        assert features.shape == (3, tower.unprojected_dim) and "forward" not in vars(tower)  # restored
        pooled = model(image=images)["image_features"]
        if kind == "vit":  # open_clip: pooled = ln_post(cls token) @ proj
            torch.testing.assert_close(features @ tower.module.proj, pooled)
        elif kind == "timm_vit":  # open_clip's TimmModel: head(trunk(x)), the head its projection
            torch.testing.assert_close(tower.module.head(features), pooled)
        else:  # ModifiedResNet: its attention pool ends in its projection; layer4 averaged over space
            seen = []
            tower.module.layer4.register_forward_hook(lambda module, args, out: seen.append(out))
            tower.module(images)
            torch.testing.assert_close(features, seen[0].mean(dim=(2, 3)))


def test_an_arch_with_its_own_logit_bias_builds_with_it_and_the_argument_wins():
    # open_clip's SigLIP archs (ViT-B-16-SigLIP) carry init_logit_bias in their config; the builder has an
    # argument of the same name, and passing both to open_clip failed ("multiple values").
    import open_clip

    text = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    vision = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
    config = {"embed_dim": 32, "init_logit_bias": -10.0, "vision_cfg": vision, "text_cfg": text}
    reference = open_clip.CustomTextCLIP(**config)  # open_clip's own reading of that config
    model = build_open_clip_model(config=config)
    assert model.logit_bias.item() == reference.logit_bias.item() == -10.0
    assert model.open_clip_config()["init_logit_bias"] == -10.0
    assert build_open_clip_model(config=config, init_logit_bias=-5.0).logit_bias.item() == -5.0
