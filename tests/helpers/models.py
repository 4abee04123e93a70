"""Tiny models built directly (no Hydra run): the default micro model and a timm BatchNorm variant."""

from __future__ import annotations

import torch

from tests.helpers.configs import compose_train

# A one-layer text tower for models built from a config dict (timm trunks, token towers).
TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def micro_model(seed: int | None = None, **options):
    """The tiny default model, built directly (no Hydra run); ``seed``: its weights from that seed;
    ``options``: ``build_open_clip_model``'s (``patch_dropout``, ``grad_checkpointing``, ...)."""
    from vlhub.models import build_open_clip_model

    if seed is not None:
        torch.manual_seed(seed)
    return build_open_clip_model(config=dict(compose_train().model.config), **options)


def timm_bn_model():
    """A two-tower model whose image tower is a tiny timm ResNet (BatchNorm, layer groups)."""
    from vlhub.models import build_open_clip_model

    torch.manual_seed(0)
    return build_open_clip_model(
        config={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32},
            "text_cfg": TINY_TEXT,
        },
        timm_backbone="test_resnet",
    )
