"""Opening one image from its bytes: the pixel cap, and every failure as a :class:`BadSample`."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from vlhub.data.batch import BadSample

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS
DEFAULT_MAX_BYTES = 512 * 2**20  # a file over 512 MiB is no training image (and would be read whole)
# What PIL raises for pixels it cannot decode. A JPEG from open_image is decoded later, by the
# transform, so whoever applies the transform catches these too (a JPEG corrupt past its header).
DECODE_ERRORS = (OSError, ValueError, SyntaxError)


def open_image(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB image from ``data``; ``name`` (``image PATH``) names it in the reason when it cannot be used.

    An image over ``max_pixels`` (``max_image_pixels``) is a bad sample, found from its header
    before any pixel is decoded; so is one PIL refuses as a decompression bomb (over twice PIL's own
    limit, whatever ``max_pixels`` says). An RGB JPEG comes back opened but not decoded, so the
    training transform can decode it at a reduced scale (``augment.draft``); decoding it later gives
    the same pixels, and a JPEG corrupt past its header is caught where it is decoded.
    """
    try:
        with warnings.catch_warnings():  # over PIL's limit but under twice it: the cap below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise BadSample(f"{name} is {image.width}x{image.height} pixels, over data.max_image_pixels={max_pixels}")
        if image.format == "JPEG" and image.mode == "RGB":
            return image
        if image.mode.startswith("I") or image.mode == "F":
            return _wide_grey_to_rgb(image)
        return image.convert("RGB")
    except (*DECODE_ERRORS, Image.DecompressionBombError) as error:
        raise BadSample(f"unreadable {name}: {error}") from error


def _wide_grey_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale (PNG ``I;16``, TIFF ``I;16``/``I``/``F``), which ``convert("RGB")``
    clips to white or black, by a stated rule: integers are 16-bit, value / 257 (0..65535 -> 0..255,
    clipped to that range); floats are clipped to [0, 1] x 255 (NaN -> 0); both rounded to nearest."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255.0
    else:
        values = np.clip(values, 0.0, 65535.0) / 257.0
    return Image.fromarray(np.rint(values).astype(np.uint8)).convert("RGB")


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as ``uint8 [3, H, W]`` (``ToTensor`` without the division)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def crop_resized(image: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """``box`` (top, left, height, width) of ``image`` resized to ``size`` x ``size``, bicubic, as RGB
    uint8 ``[3, size, size]``: exactly torchvision's ``resized_crop`` on PIL, then open_clip's RGB."""
    top, left, height, width = box
    cropped = image.crop((left, top, left + width, top + height))
    return to_uint8_tensor(cropped.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"))


def is_undecoded_jpeg(image: Image.Image) -> bool:
    """Whether ``image`` is an RGB JPEG as :func:`open_image` returns it: opened from its bytes, not decoded
    (PIL drops ``fp`` once it decodes), at its full size (no ``draft`` scale taken)."""
    undecoded = isinstance(getattr(image, "fp", None), io.BytesIO) and bool(getattr(image, "tile", None))
    drafted = bool(getattr(image, "decoderconfig", ())) and image.decoderconfig[0] != 1  # type: ignore[attr-defined]
    return undecoded and image.format == "JPEG" and image.mode == "RGB" and not drafted
