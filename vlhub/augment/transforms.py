"""Image transforms for training and evaluation, sized and normalised for the model.

Training transforms stop before ``ToTensor``/``Normalize``: they return ``uint8 [3, H, W]``,
which is four times cheaper to collate, pin and copy than float. The device side finishes
the job (``vlhub.data.batch.move_batch``: ``float() / 255``, then the model's mean and std),
with the same arithmetic as ``ToTensor`` + ``Normalize``, so the tensors equal today's.
Evaluation transforms return normalised float tensors, as ``vlhub.load``'s preprocess promises.

JPEG draft decoding (``draft``): the crop is drawn first, from the image's header
size (the same random draws as torchvision's ``RandomResizedCrop``); then, if the source is an
opened, not yet decoded JPEG, libjpeg decodes it at the smallest DCT scale (1/2, 1/4, 1/8)
at which the crop still spans at least ``draft_min_fraction`` of the output's side (1.0:
never fewer source pixels than output pixels, so no upsampling). Off, or for images already
decoded, the pixels are exactly open_clip's.

The default, 0.75, lets a 500x375 ImageNet-like JPEG decode at 1/2 for a 224 crop (the crop's
short side, 355-375 px, becomes 178-188 px, resized up to 224): 1.8x open_clip's pipeline
(benchmarks/data_pipeline.py), a mean difference of about 1 grey level in 255 from the exact
pixels on the benchmark's images, and up to 1/4 fewer source rows or columns than output ones.
``draft_min_fraction=1.0`` drafts only sources at least twice the crop (no resolution lost);
``draft=false`` gives open_clip's pixels exactly.

Device decoding (``decode="cuda"``): the crop is drawn the same way, but an undecoded RGB JPEG is
returned as a :class:`~vlhub.data.device_decode.EncodedView` (its bytes and the crop box), decoded,
cropped and resized on the training device (``vlhub.data.device_decode``); ``draft`` does not apply
to it. Every other image is cropped and resized here, as with ``decode="cpu"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from open_clip.transform import AugmentationCfg, image_transform
from PIL import Image
from torchvision.transforms import (
    CenterCrop,
    ColorJitter,
    Compose,
    GaussianBlur,
    InterpolationMode,
    RandomApply,
    RandomGrayscale,
    RandomHorizontalFlip,
    Resize,
    ToTensor,
)
from torchvision.transforms import RandomResizedCrop as TorchRandomResizedCrop

from vlhub.data.device_decode import EncodedView
from vlhub.data.images import crop_resized, is_undecoded_jpeg, to_uint8_tensor
from vlhub.models.vision_language import ImageStats
from vlhub.registry import TRANSFORMS

ImageTransform = Callable[[object], torch.Tensor]
DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg's DCT scaling offers through PIL
DECODE_DEVICES = ("cpu", "cuda")  # where a training view's JPEG is decoded


@dataclass(frozen=True)
class Transforms:
    train: ImageTransform  # -> uint8 [3, H, W]; normalised on the device
    eval: ImageTransform  # -> float [3, H, W], normalised
    random: bool = True  # whether two draws of ``train`` differ (objectives comparing augment_views need it)
    device_decode: bool = False  # whether ``train`` leaves JPEGs to the device (``vlhub.data.device_decode``)


def draft_scale(image: Image.Image, crop: tuple[int, int], size: int, min_fraction: float) -> int:
    """Switch an undecoded JPEG to the smallest DCT scale that keeps ``crop`` (h, w) at least
    ``min_fraction * size`` pixels a side; returns the reduction (1 when none applies)."""
    height, width = crop
    for scale in DRAFT_SCALES:
        if min(height, width) / scale >= min_fraction * size:
            # PIL picks the largest reduction with size[i] // request[i] >= scale, i.e. this one.
            original_width = image.size[0]
            request = (max(1, original_width // scale), max(1, image.size[1] // scale))
            drafted = image.draft(image.mode, request)
            if drafted is None:  # already decoded, or not a JPEG
                return 1
            return round(original_width / drafted[1][2])  # the reduction PIL took
    return 1


class RandomResizedCropUint8:
    """open_clip's training crop (RandomResizedCrop, bicubic, then RGB) returning uint8.

    Draws the crop with torchvision's ``RandomResizedCrop.get_params`` (the same random numbers
    as open_clip's transform), optionally decodes a JPEG at a reduced scale, and resizes; with
    ``decode="cuda"`` an undecoded RGB JPEG comes back as an ``EncodedView`` for the device instead.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        draft: bool = False,
        draft_min_fraction: float = 1.0,
        decode: str = "cpu",
    ) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio
        self.draft, self.draft_min_fraction, self.decode = draft, draft_min_fraction, decode

    def __call__(self, image: Image.Image) -> torch.Tensor | EncodedView:
        top, left, height, width = TorchRandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        if self.decode == "cuda" and is_undecoded_jpeg(image):  # the same draws; the pixels are the device's
            data = torch.frombuffer(bytearray(image.fp.getvalue()), dtype=torch.uint8)  # type: ignore[union-attr]
            return EncodedView(data, (top, left, height, width), self.size)
        reduction = 1
        if self.draft:
            reduction = draft_scale(image, (height, width), self.size, self.draft_min_fraction)
        if reduction == 1:  # exactly torchvision's resized_crop on PIL, then open_clip's RGB
            return crop_resized(image, (top, left, height, width), self.size)
        # the same box, in the reduced image's coordinates
        box = (left / reduction, top / reduction, (left + width) / reduction, (top + height) / reduction)
        box = (box[0], box[1], min(box[2], image.size[0]), min(box[3], image.size[1]))
        resized = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        return to_uint8_tensor(resized.convert("RGB"))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, draft={self.draft}, "
            f"draft_min_fraction={self.draft_min_fraction}, decode={self.decode!r})"
        )


def cuda_available() -> bool:
    """Whether ``decode="cuda"`` can run here; one function, so a test can run the device path on the CPU."""
    return torch.cuda.is_available()


def _checked_scale(scale: tuple[float, float]) -> tuple[float, float]:
    """``scale`` as (lo, hi), or ValueError naming it."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale={list(scale)} must satisfy 0 < lo <= hi <= 1")
    return lo, hi


def _eval_transform(stats: ImageStats) -> ImageTransform:
    """open_clip's evaluation transform: resize, centre crop, normalised float."""
    return image_transform(stats.size, is_train=False, mean=stats.mean, std=stats.std)


@TRANSFORMS.register("clip")
def build_clip_transforms(
    stats: ImageStats,
    scale: tuple[float, float] = (0.9, 1.0),
    draft: bool = True,
    draft_min_fraction: float = 0.75,
    decode: str = "cpu",
) -> Transforms:
    """open_clip's recipe: RandomResizedCrop(scale) for training (uint8 out), resize + centre crop for eval.

    ``decode``: where the training crops' JPEGs are decoded, ``"cpu"`` (in the data workers) or ``"cuda"``
    (batched on the training device, ``vlhub.data.device_decode``; the same crops, ``draft`` not applied)."""
    scale = _checked_scale(scale)
    if not 0 < draft_min_fraction <= 1:
        raise ValueError(f"draft_min_fraction must be in (0, 1], got {draft_min_fraction}")
    if decode not in DECODE_DEVICES:
        raise ValueError(f"decode={decode!r} must be one of {', '.join(DECODE_DEVICES)}")
    if decode == "cuda" and not cuda_available():
        raise ValueError("decode=cuda needs a CUDA device; torch.cuda.is_available() is False (use decode=cpu)")
    train = RandomResizedCropUint8(stats.size, scale, draft=draft, draft_min_fraction=draft_min_fraction, decode=decode)
    return Transforms(train=train, eval=_eval_transform(stats), device_decode=decode == "cuda")


def open_clip_train_transform(stats: ImageStats, scale: tuple[float, float] = (0.9, 1.0)) -> ImageTransform:
    """open_clip's own float training transform: the reference the uint8 path is tested against."""
    return image_transform(
        stats.size, is_train=True, mean=stats.mean, std=stats.std, aug_cfg=AugmentationCfg(scale=tuple(scale))
    )


@TRANSFORMS.register("none")
def build_plain_transforms(stats: ImageStats) -> Transforms:
    """No augmentation: resize and centre crop (uint8 for training, normalised for eval)."""
    plain = _eval_transform(stats)
    steps = plain.transforms
    if not (isinstance(steps[0], Resize) and isinstance(steps[1], CenterCrop) and isinstance(steps[-2], ToTensor)):
        raise TypeError(f"unexpected open_clip eval transform layout: {plain}")
    return Transforms(train=Compose([*steps[:-2], to_uint8_tensor]), eval=plain, random=False)


@TRANSFORMS.register("simclr")
def build_simclr_transforms(
    stats: ImageStats,
    scale: tuple[float, float] = (0.08, 1.0),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
) -> Transforms:
    """SimCLR's recipe: random resized crop, colour jitter, grayscale, Gaussian blur, flip (uint8 out).

    The blur kernel is about a tenth of the image side (odd), sigma in [0.1, 2], as in SimCLR.
    Evaluation is the plain resize and centre crop.
    """
    scale = _checked_scale(scale)
    for name, p in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    kernel = max(3, int(0.1 * stats.size) // 2 * 2 + 1)
    train = Compose(
        [
            TorchRandomResizedCrop(stats.size, scale=scale, interpolation=InterpolationMode.BICUBIC),
            RandomApply([ColorJitter(*jitter)], p=jitter_p),
            RandomGrayscale(p=grayscale_p),
            RandomApply([GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
            RandomHorizontalFlip(),
            to_uint8_tensor,
        ]
    )
    return Transforms(train=train, eval=_eval_transform(stats))
