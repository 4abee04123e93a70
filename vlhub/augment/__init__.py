"""Image transforms for training and evaluation, sized and normalised for the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from open_clip.transform import AugmentationCfg, image_transform

from vlhub.models.vision_language import ImageStats
from vlhub.registry import TRANSFORMS

ImageTransform = Callable[[object], torch.Tensor]


@dataclass(frozen=True)
class Transforms:
    train: ImageTransform
    eval: ImageTransform


@TRANSFORMS.register("clip")
def build_clip_transforms(stats: ImageStats, scale: tuple[float, float] = (0.9, 1.0)) -> Transforms:
    """open_clip's recipe: RandomResizedCrop(scale) for training, resize + centre crop for eval."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"augment.scale must satisfy 0 < lo <= hi <= 1, got {list(scale)}")
    return Transforms(
        train=image_transform(
            stats.size, is_train=True, mean=stats.mean, std=stats.std, aug_cfg=AugmentationCfg(scale=(lo, hi))
        ),
        eval=image_transform(stats.size, is_train=False, mean=stats.mean, std=stats.std),
    )


@TRANSFORMS.register("none")
def build_plain_transforms(stats: ImageStats) -> Transforms:
    """No augmentation: the eval transform (resize, centre crop, normalise) for both."""
    plain = image_transform(stats.size, is_train=False, mean=stats.mean, std=stats.std)
    return Transforms(train=plain, eval=plain)
