"""Image preprocessing for the vision encoder, with transformers' image-processor semantics.

Same steps as ``SiglipImageProcessor`` (PIL backend): convert to RGB, resize to size x size with
PIL bicubic on the uint8 image, rescale by 1/255, normalise with mean/std, channels first.
The spec comes from :func:`vlmforge.model.geometry.image_preprocess_spec` (size, mean, std, rescale).
Decoding (and RGB conversion of grayscale/CMYK/RGBA) is :func:`vlmforge.shards.decode_image`.
"""

from __future__ import annotations

import numpy as np
import torch


def preprocess(image, spec: dict) -> torch.Tensor:
    """PIL image -> FloatTensor[3, size, size] (resize, rescale, normalise)."""
    from PIL import Image

    size = int(spec["size"])
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.float32)
    arr = arr * np.float32(spec.get("rescale", 1 / 255))
    arr = (arr - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def preprocess_batch(images, spec: dict) -> torch.Tensor:
    """PIL images -> FloatTensor[N, 3, size, size] (N may be 0)."""
    size = int(spec["size"])
    if not images:
        return torch.zeros(0, 3, size, size)
    return torch.stack([preprocess(im, spec) for im in images])


def load_pixel_values(image_bytes: bytes, spec: dict) -> torch.Tensor:
    """Encoded bytes -> FloatTensor[3, size, size]; raises ``vlmforge.shards.ImageDecodeError``."""
    from vlmforge.shards import decode_image

    return preprocess(decode_image(image_bytes), spec)
