"""Tiny models built directly (no Hydra run): the default micro model and a timm BatchNorm variant."""

from __future__ import annotations

import torch

from tests.helpers.configs import compose_train


def micro_model():
    """The tiny default model, built directly (no Hydra)."""
    from vlhub.models import build_open_clip_model

    cfg = compose_train()
    return build_open_clip_model(config=dict(cfg.model.config))


def timm_bn_model():
    """A two-tower model whose image tower is a tiny timm ResNet (BatchNorm, layer groups)."""
    from vlhub.models import build_open_clip_model

    torch.manual_seed(0)
    return build_open_clip_model(
        config={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        timm_backbone="test_resnet",
    )
