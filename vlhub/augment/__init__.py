"""Image transforms for training and evaluation (``vlhub/augment/transforms.py``), registered in ``TRANSFORMS``."""

from vlhub.augment.transforms import (
    DRAFT_SCALES,
    ImageTransform,
    RandomResizedCropUint8,
    Transforms,
    build_clip_transforms,
    build_plain_transforms,
    build_simclr_transforms,
    draft_scale,
    open_clip_train_transform,
    to_uint8_tensor,
)

__all__ = [
    "DRAFT_SCALES",
    "ImageTransform",
    "RandomResizedCropUint8",
    "Transforms",
    "build_clip_transforms",
    "build_plain_transforms",
    "build_simclr_transforms",
    "draft_scale",
    "open_clip_train_transform",
    "to_uint8_tensor",
]
