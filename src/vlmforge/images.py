"""Image preprocessing for the vision encoder, with transformers' image-processor semantics.

Same steps as ``SiglipImageProcessor`` (PIL backend): convert to RGB, resize to size x size with
PIL bicubic on the uint8 image, rescale by 1/255, normalise with mean/std, channels first.
The spec comes from :func:`vlmforge.arch.geometry.image_preprocess_spec` (size, mean, std, rescale).
Decoding (and RGB conversion of grayscale/CMYK/RGBA) is :func:`vlmforge.imagedecode.decode_image`.
:func:`dynamic_tiles` cuts an image into InternVL's dynamic-resolution tiles (grid from
:mod:`vlmforge.arch.tiles`); each tile is then preprocessed like any image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlmforge.arch.tiles import DEFAULT_MAX_TILES, DEFAULT_MIN_TILES, DEFAULT_TILE, ImageLayout, grid_for
from vlmforge.imagedecode import decode_image


def _scale_offset(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(x * rescale - mean) / std == x * scale + offset, as two in-place passes (float rounding ~1e-7)."""
    mean = np.asarray(spec["mean"], np.float32)
    std = np.asarray(spec["std"], np.float32)
    scale = np.float32(spec.get("rescale", 1 / 255)) / std
    return scale[:, None, None], (-mean / std)[:, None, None]


def preprocess_into(image, spec: dict, out: np.ndarray) -> None:
    """Write the preprocessed image into ``out`` (float32 [3, size, size]); no temporary float arrays."""
    size = int(spec["size"])
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    # channels-first on uint8 (cheap), one cast into `out`, two in-place passes: no fresh float
    # HWC arrays for rescale/normalise (big fresh buffers page-fault).
    np.copyto(out, np.asarray(image).transpose(2, 0, 1), casting="unsafe")
    scale, offset = _scale_offset(spec)
    out *= scale
    out += offset


def preprocess(image, spec: dict) -> torch.Tensor:
    """PIL image -> FloatTensor[3, size, size] (resize, rescale, normalise)."""
    size = int(spec["size"])
    out = np.empty((3, size, size), dtype=np.float32)
    preprocess_into(image, spec, out)
    return torch.from_numpy(out)


def preprocess_batch(images, spec: dict) -> torch.Tensor:
    """PIL images -> FloatTensor[N, 3, size, size] (N may be 0), written into one buffer."""
    size = int(spec["size"])
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for k, im in enumerate(images):
        preprocess_into(im, spec, out[k])
    return torch.from_numpy(out)


def load_pixel_values(image_bytes: bytes, spec: dict) -> torch.Tensor:
    """Encoded bytes -> FloatTensor[3, size, size]; raises ``vlmforge.imagedecode.ImageDecodeError``."""
    return preprocess(decode_image(image_bytes), spec)


def dynamic_tiles(image: Image.Image, tile: int = DEFAULT_TILE, min_tiles: int = DEFAULT_MIN_TILES,
                  max_tiles: int = DEFAULT_MAX_TILES, thumbnail: bool = True) -> list[Image.Image]:
    """InternVL's dynamic high resolution: ``tile x tile`` PIL tiles, row-major, thumbnail last.

    The image is resized (bicubic, PIL's default for RGB, as InternVL's ``image.resize``) to
    ``(tile * cols, tile * rows)`` for the grid of :func:`vlmforge.arch.tiles.grid_for`, cut left to
    right, top to bottom; with more than one tile the whole image resized to ``tile x tile`` follows
    when ``thumbnail`` is set. A multi-image sample passes each image
    ``Tiling.for_images(n).max_tiles`` as ``max_tiles``."""
    cols, rows = grid_for(image.width, image.height, tile, min_tiles, max_tiles)
    resized = image.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile, tile), Image.Resampling.BICUBIC))
    return tiles


def tile_images(images: list[Image.Image], layout: ImageLayout) -> list[Image.Image]:
    """The tower inputs of one sample's images, in order: each image itself without tiling, else its
    dynamic tiles (thumbnail last) under the sample's shared budget (``Tiling.for_images``). Their
    count per image is ``layout.tiles([im.size for im in images])``, what the placeholders expect."""
    if layout.tiling is None or not images:
        return list(images)
    each = layout.tiling.for_images(len(images))
    out: list[Image.Image] = []
    for im in images:
        if im.mode != "RGB":
            im = im.convert("RGB")
        out.extend(dynamic_tiles(im, each.tile, each.min_tiles, each.max_tiles, each.thumbnail))
    return out
