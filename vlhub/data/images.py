"""Opening one image from its bytes: the pixel cap, and every failure as a :class:`BadSample`."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from vlhub.data.batch import BadSample

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS
# What PIL raises for pixels it cannot decode. A JPEG from open_image is decoded later, by the
# transform, so whoever applies the transform catches these too (a JPEG corrupt past its header).
DECODE_ERRORS = (OSError, ValueError, SyntaxError)


def open_image(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB image from ``data``; ``name`` (``image PATH``) names it in the reason when it cannot be used.

    An image over ``max_pixels`` (``data.max_image_pixels``) is a bad sample, found from its header
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
        return image.convert("RGB")
    except (*DECODE_ERRORS, Image.DecompressionBombError) as error:
        raise BadSample(f"unreadable {name}: {error}") from error
