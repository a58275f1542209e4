"""Image bytes -> a fully loaded 8-bit RGB ``PIL.Image``: the one place vlmforge decodes an image.

Shards, pretraining and SFT data, curation, evaluation and generation all decode with
:func:`decode_image`, so every stage sees the same pixels from the same bytes; what does not
decode raises :class:`ImageDecodeError` (over the pixel cap: :class:`ImageTooLargeError`), which
long jobs catch, skip and count. :func:`header_size` reads an image's size from its header alone,
with the same errors and the same cap, for the stages that count tiles before decoding.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

# Pixel cap of every decode (and of header_size): an image over it is skipped and counted as image_too_large.
MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image (truncated, not an image, unsupported)."""


class ImageTooLargeError(ImageDecodeError):
    """An image over the pixel cap (:data:`MAX_PIXELS` by default, or PIL's decompression-bomb
    limit); counted as ``image_too_large``, not as undecodable. The message names the cap."""

    reason = "image_too_large"


def _to_8bit(im):
    """A high-depth single-channel image (``I;16*``, ``I``, ``F``) as mode ``L``, scaled, not clipped:
    16-bit values 0..65535 map to 0..255 (divide by 257); ``I`` is read as 16-bit data (what PNG and
    TIFF decoders give), clipped to 0..65535 first; ``F`` in [0, 1] is scaled by 255, otherwise read
    as 0..255 (or as 16-bit when its maximum is above 255)."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if top <= 1.0 else (1.0 if top <= 255.0 else 1 / 257)
        out = arr * scale
    else:
        out = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def _too_large(width: int, height: int, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(f"image too large: {width}x{height} = {width * height} pixels, "
                              f"over the cap of {max_pixels} pixels")


def _bomb(e: Exception) -> ImageTooLargeError:
    return ImageTooLargeError(f"image too large: {e} (PIL's cap Image.MAX_IMAGE_PIXELS)")


def open_image(src):
    """``Image.open`` without PIL's decompression-bomb warning: our own cap (or PIL's error at twice
    its limit) turns such an image into one counted ImageTooLargeError, not a warning per image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(src)


def header_size(image: str | os.PathLike | bytes, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file (a path) or of encoded bytes, from its header: no pixels
    decoded, and the size :func:`decode_image` gives (it applies no EXIF rotation). Raises
    ``ImageTooLargeError`` over the pixel cap (as the decode would), ``ImageDecodeError`` for what
    is not an image; a path that does not exist raises ``FileNotFoundError``."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not image:
            raise ImageDecodeError("empty image bytes")
        src = io.BytesIO(image)
    else:
        src = os.fspath(image)
    try:
        with open_image(src) as im:
            w, h = (int(v) for v in im.size)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as e:  # not a ValueError/OSError: PIL's own cap, hit in open()
        raise _bomb(e) from e
    except Exception as e:  # PIL raises many types for what is not an image
        raise ImageDecodeError(f"cannot read the image header: {e}") from e
    if max_pixels is not None and w * h > max_pixels:
        raise _too_large(w, h, max_pixels)
    return w, h


def decode_image(data: bytes | None, max_pixels: int | None = MAX_PIXELS):
    """Bytes -> fully loaded RGB ``PIL.Image`` (8 bits per channel). Grayscale/CMYK/palette are
    converted; 16-bit and float images are scaled to 8 bits (``_to_8bit``), not clipped; alpha is
    composited on white (dropping it would expose arbitrary colours under transparent pixels).
    Raises ``ImageTooLargeError`` over the pixel cap, ``ImageDecodeError`` for anything that does
    not decode completely."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        im = open_image(io.BytesIO(data))
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise _too_large(im.width, im.height, max_pixels)
        im.load()  # truncated files fail here, not at open()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own cap (Image.MAX_IMAGE_PIXELS), hit in open()
        raise _bomb(e) from e
    except Exception as e:  # PIL raises many types for bad data
        raise ImageDecodeError(f"cannot decode image: {e}") from e
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    elif im.mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first
        im = im.convert("RGBA") if im.mode == "RGBa" else im.convert("LA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB") if im.mode != "RGB" else im
