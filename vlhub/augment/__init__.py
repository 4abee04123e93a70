"""Image transforms for training and evaluation, sized and normalised for the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from open_clip.transform import AugmentationCfg, image_transform
from torchvision import transforms as T

from vlhub.models.vision_language import ImageStats
from vlhub.registry import TRANSFORMS

ImageTransform = Callable[[object], torch.Tensor]


@dataclass(frozen=True)
class Transforms:
    train: ImageTransform
    eval: ImageTransform
    random: bool = True  # whether two draws of ``train`` differ (two-view objectives need it)


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
    return Transforms(train=plain, eval=plain, random=False)


@TRANSFORMS.register("simclr")
def build_simclr_transforms(
    stats: ImageStats,
    scale: tuple[float, float] = (0.08, 1.0),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
) -> Transforms:
    """SimCLR's recipe: random resized crop, colour jitter, grayscale, Gaussian blur, flip.

    The blur kernel is about a tenth of the image side (odd), sigma in [0.1, 2], as in SimCLR.
    Evaluation is the plain resize and centre crop.
    """
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"augment.scale must satisfy 0 < lo <= hi <= 1, got {list(scale)}")
    for name, p in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
        if not 0 <= p <= 1:
            raise ValueError(f"augment.{name} must be in [0, 1], got {p}")
    kernel = max(3, int(0.1 * stats.size) // 2 * 2 + 1)
    train = T.Compose(
        [
            T.RandomResizedCrop(stats.size, scale=(lo, hi), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
            T.RandomGrayscale(p=grayscale_p),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(stats.mean, stats.std),
        ]
    )
    return Transforms(train=train, eval=image_transform(stats.size, is_train=False, mean=stats.mean, std=stats.std))
