"""Random JPEG quality, InternVL's SFT augmentation: each tile is encoded as JPEG at a quality
drawn uniformly from 75..100 and decoded again, before the normal preprocessing. Applied with
probability 1 on the sources that ask for it, in training only.

As InternVL, the image is tiled first and every tile (the thumbnail too) re-encoded on its own;
without tiling an image is one tile, so each image is re-encoded once.

The quality is a pure function of (seed, epoch, sample, tile): the same sample in the same epoch
gets the same pixels on any rank, in any DataLoader worker and after a resume; another epoch
draws again. ``tile`` counts the tower inputs of the sample in order: tile k is the k-th tile
over all its images (the k-th image without tiling).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

JPEG_QUALITY_MIN, JPEG_QUALITY_MAX = 75, 100  # InternVL's range, both ends included
_STREAM = 0x4A504547  # "JPEG": keeps these draws apart from the epoch plan's (seed, epoch) stream


def jpeg_quality(seed: int, epoch: int, sample: int, tile: int = 0) -> int:
    """The JPEG quality for ``tile`` of index record ``sample`` in ``epoch`` of a run seeded ``seed``."""
    rng = np.random.default_rng([int(seed) % 2**63, int(epoch), int(sample), int(tile), _STREAM])
    return int(rng.integers(JPEG_QUALITY_MIN, JPEG_QUALITY_MAX + 1))


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    """``image`` encoded as JPEG at ``quality`` (PIL's encoder, its default chroma subsampling, as
    InternVL calls it) and decoded again, as a loaded RGB image."""
    with io.BytesIO() as buf:
        image.convert("RGB").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            return im.convert("RGB")


def jpeg_augment(images: list, seed: int, epoch: int, sample: int) -> list:
    """Every tower input of a sample (its tiles in order, or its images without tiling) re-encoded
    at its own drawn quality (tile k = the k-th of ``images``)."""
    return [jpeg_reencode(im, jpeg_quality(seed, epoch, sample, k)) for k, im in enumerate(images)]
