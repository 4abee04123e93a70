"""Vision-language models built from open_clip configs (any open_clip arch, or a config dict).

Both towers come from open_clip (a timm trunk through open_clip's ``TimmModel`` when a
timm backbone is named), so weights keep open_clip's names and a vlhub checkpoint loads with
``open_clip.create_model(arch, pretrained=PATH)``.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from vlhub.models.tower_weights import load_tower_pretrained
from vlhub.models.towers import OpenClipImageTower, OpenClipTextTower, Tower
from vlhub.models.vision_language import ImageStats, OpenClipLayout, VisionLanguageModel
from vlhub.registry import MODELS

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


def _plain(value: Any) -> Any:
    """Plain dicts and lists from any mapping / sequence (open_clip's configs must be plain)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _resolve_config(arch: str | None, config: Mapping | None) -> dict:
    if (arch is None) == (config is None):
        raise ValueError("give exactly one of model.arch (an open_clip model name) or model.config")
    if config is not None:
        return _plain(config)
    resolved = open_clip.get_model_config(arch)
    if resolved is None:
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; open_clip knows: {', '.join(open_clip.list_models()[:40])}, ..."
        )
    return resolved


def _build_tokenizer(text_cfg: dict):
    context_length = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return _simple_tokenizer(context_length)


@functools.cache
def _simple_tokenizer(context_length: int) -> SimpleTokenizer:
    """One per context length for the process: building one parses open_clip's 49k BPE merges (about 0.1 s,
    most of a small model's build), and it keeps no per-model state, only a memo of the words it has split."""
    return SimpleTokenizer(context_length=context_length)


@MODELS.register("open_clip")
def build_open_clip_model(
    arch: str | None = None,
    config: dict | None = None,
    pretrained: str | None = None,
    timm_backbone: str | None = None,
    timm_pretrained: bool = False,
    image_size: int | None = None,
    context_length: int | None = None,
    init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
    init_logit_bias: float | None = None,
    max_logit_scale: float = 100.0,
    image_pretrained: str | None = None,
    text_pretrained: str | None = None,
    pretrained_skip: list[str] | None = None,
    patch_dropout: float = 0.0,
    grad_checkpointing: bool = False,
) -> VisionLanguageModel:
    """Build a two-tower model from an open_clip arch name or an open_clip config dict.

    ``pretrained`` is an open_clip tag (downloaded when online) or a local checkpoint path.
    ``timm_backbone`` swaps the image tower for any timm model (open_clip's TimmModel), with
    timm's own pretrained weights when ``timm_pretrained`` (downloaded, or from timm's cache).
    ``image_pretrained`` / ``text_pretrained`` (a path or an open_clip tag) load one tower each,
    after ``pretrained``, from an open_clip, vlhub or timm checkpoint (``models/tower_weights.py``);
    ``pretrained_skip`` lists glob patterns of tower keys left as initialised.
    ``patch_dropout`` drops that fraction of image patches in training (FLIP; ViT towers only, open_clip's
    or timm's); ``grad_checkpointing`` recomputes both towers' blocks in the backward instead of storing
    their activations. A tower that cannot honour either fails here, naming the key.
    """
    model_cfg = _resolve_config(arch, config)
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if timm_backbone is not None:
        keep = {"image_size": vision_cfg.get("image_size", 224)}
        vision_cfg.clear()
        vision_cfg.update(
            keep,
            timm_model_name=timm_backbone,
            timm_model_pretrained=timm_pretrained,
            timm_pool="avg",
            timm_proj="linear",
        )
    if image_size is not None:
        vision_cfg["image_size"] = image_size
    if context_length is not None:
        text_cfg["context_length"] = context_length
    # CLIP-class archs keep text weights at the top level in open_clip; others under "text.".
    text_prefix = "text." if model_cfg.get("custom_text") or "hf_model_name" in text_cfg else ""
    export_cfg = copy.deepcopy(model_cfg)  # the architecture; patch dropout is a training setting
    model_cfg.pop("custom_text", None)
    model_cfg.pop("multimodal_cfg", None)  # captioning heads belong to the coca objective
    arch_bias = model_cfg.pop("init_logit_bias", None)  # an arch's own start (SigLIP's: -10); the argument wins
    init_logit_bias = arch_bias if init_logit_bias is None else init_logit_bias
    clip = _build_clip(model_cfg, patch_dropout, init_logit_scale, init_logit_bias)
    embed_dim = int(model_cfg["embed_dim"])
    towers = {"image": OpenClipImageTower(clip.visual, embed_dim), "text": OpenClipTextTower(clip.text, embed_dim)}
    if patch_dropout > 0 and towers["image"].patch_dropout == 0:  # e.g. ModifiedResNet takes the key and ignores it
        raise ValueError(_no_patches(patch_dropout, towers["image"].describe()))
    if grad_checkpointing:
        for which, tower in towers.items():
            apply_grad_checkpointing(tower, which)
    if pretrained:
        _load_pretrained(clip, arch, pretrained)
    tower_loaded = []  # vlhub's state-dict keys that the tower files set
    for which, source, tower in (("image", image_pretrained, clip.visual), ("text", text_pretrained, clip.text)):
        if source:
            report = load_tower_pretrained(tower, source, which, arch, pretrained_skip or ())
            tower_loaded += [f"{which}_tower.module.{key}" for key in report["loaded"]]

    preprocess = clip.visual.preprocess_cfg if hasattr(clip.visual, "preprocess_cfg") else {}
    size = vision_cfg.get("image_size", 224)
    stats = ImageStats(
        size=int(size[0] if isinstance(size, list | tuple) else size),
        mean=tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
    )
    model = VisionLanguageModel(
        image_tower=towers["image"],
        text_tower=towers["text"],
        tokenizer=_build_tokenizer(text_cfg),
        image_stats=stats,
        init_logit_scale=init_logit_scale,
        init_logit_bias=init_logit_bias,
        max_logit_scale=max_logit_scale,
        open_clip_layout=OpenClipLayout(arch=arch, model_cfg=export_cfg, text_prefix=text_prefix),
    )
    with torch.no_grad():
        model.logit_scale.copy_(clip.logit_scale.reshape(()))
        if model.logit_bias is not None:
            model.logit_bias.copy_(clip.logit_bias.reshape(()))
    if pretrained:  # a whole open_clip checkpoint, loaded strictly: every key, the temperature included
        model.loaded_keys.update(model.state_dict())
    if timm_backbone is not None and timm_pretrained:  # timm's weights for the trunk (not the projection)
        model.loaded_keys.update(k for k in model.state_dict() if k.startswith("image_tower.module.trunk."))
    model.loaded_keys.update(tower_loaded)
    return model


def _build_clip(
    model_cfg: dict, patch_dropout: float, init_logit_scale: float, init_logit_bias: float | None
) -> open_clip.CustomTextCLIP:
    """open_clip's model, with ``patch_dropout`` in its vision config (open_clip hands it to its
    VisionTransformer, or to a timm trunk as ``patch_drop_rate``; the caller checks it is honoured)."""
    if not 0.0 <= patch_dropout < 1.0:
        raise ValueError(f"model.patch_dropout={patch_dropout} must be in [0, 1)")
    if patch_dropout > 0:
        model_cfg["vision_cfg"]["patch_dropout"] = patch_dropout
    try:
        clip = open_clip.CustomTextCLIP(**model_cfg, init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias)
    except TypeError as error:  # a timm trunk without patches refuses timm's patch_drop_rate
        if patch_dropout > 0 and "patch_drop_rate" in str(error):
            raise ValueError(_no_patches(patch_dropout, error)) from None
        raise
    return clip


def _no_patches(patch_dropout: float, why: object) -> str:
    return f"model.patch_dropout={patch_dropout}: the image tower has no patches to drop ({why}); it needs a ViT tower"


def apply_grad_checkpointing(tower: Tower, which: str) -> None:
    """``model.grad_checkpointing=true`` on one tower, through the tower (which checks that it took:
    open_clip's ResNet accepts the call and does nothing); the error names the key."""
    try:
        tower.set_grad_checkpointing(True)
    except ValueError as error:
        raise ValueError(f"model.grad_checkpointing=true: the {which} tower cannot checkpoint ({error})") from None


def _load_pretrained(clip: torch.nn.Module, arch: str | None, pretrained: str) -> None:
    if os.path.isfile(pretrained):
        open_clip.load_checkpoint(clip, pretrained, strict=True, weights_only=True)
        return
    if arch is None or open_clip.get_pretrained_cfg(arch, pretrained) == {}:
        raise FileNotFoundError(
            f"model.pretrained={pretrained!r} is neither a file nor an open_clip tag of "
            f"{arch!r} (tags: {open_clip.list_pretrained_tags_by_model(arch) if arch else []})"
        )
    path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, pretrained))
    open_clip.load_checkpoint(clip, path, strict=True, weights_only=True)
