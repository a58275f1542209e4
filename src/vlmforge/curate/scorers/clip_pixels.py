"""A CLIP / SigLIP image processor's pixels without the processor: the same values, less work per image.

transformers' PIL-backend processors (``CLIPImageProcessorPil``, ``SiglipImageProcessorPil``, the
slow processors of older releases) convert each image to numpy and back to PIL to resize it, then
centre-crop, rescale in float64 and normalise in float32, one fresh array per step.
:class:`ProcessorPixels` reads the processor's settings and does the same steps directly: PIL's
resize (same size rule, same filter) on the RGB image, the crop on the uint8 result, and rescale +
normalise as one lookup table per channel built with the processor's own operations and dtypes,
so every value is bit-identical. :func:`processor_pixels` checks that on test images at load time
and returns None (use the processor) for any processor or setting it does not reproduce.

``draft`` (opt-in, changes the pixels): JPEGs are decoded at a reduced scale (libjpeg's DCT
scaling, 1/2 to 1/8) that still leaves at least the resize target, see
:meth:`ProcessorPixels.draft_size` and :func:`vlmforge.curate.io.decode_scaled`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

# Sizes of the load-time self-check: landscape, portrait, square, smaller than the crop, odd sizes.
CHECK_SIZES = ((37, 23), (23, 41), (30, 30), (7, 5), (101, 64))


def _size_key(size, key: str):
    """A processor's size entry (a dict in older transformers, a SizeDict in newer)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class ProcessorPixels:
    """The pixel steps of a PIL-backend CLIP / SigLIP image processor, as plain values."""

    def __init__(self, resize_to: tuple[str, int, int] | None, resample: int, crop: tuple[int, int] | None,
                 rescale: float | None, mean: list[float] | None, std: list[float] | None):
        # resize_to: ("square", h, w) resizes to h x w; ("shortest", s, 0) scales the shorter edge to s
        self.resize_to, self.resample, self.crop = resize_to, Image.Resampling(int(resample)), crop
        self.lut = self._lut(rescale, mean, std)

    @staticmethod
    def _lut(rescale, mean, std) -> np.ndarray:
        """[3, 256] output value of each uint8 input per channel, by transformers' own arithmetic:
        ``rescale`` is float64 x factor cast to float32, ``normalize`` float32 (x - mean) / std."""
        v = np.arange(256, dtype=np.uint8)[None].repeat(3, 0)
        if rescale is not None:
            v = (v.astype(np.float64) * rescale).astype(np.float32)
        if mean is not None:
            v = v.astype(np.float32) if not np.issubdtype(v.dtype, np.floating) else v
            m, s = np.array(mean, dtype=v.dtype), np.array(std, dtype=v.dtype)
            v = ((v.T - m) / s).T
        return np.ascontiguousarray(v)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) after resize and crop of a ``width x height`` image."""
        h, w = self._resized(width, height)
        return self.crop if self.crop is not None else (h, w)

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the resize: transformers' ``get_resize_output_image_size`` (int() of the long side)."""
        if self.resize_to is None:
            return height, width
        kind, a, b = self.resize_to
        if kind == "square":
            return a, b
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(a * long / short)
        return (new_long, a) if width <= height else (a, new_long)

    def draft_size(self) -> tuple[int, int] | None:
        """The smallest (width, height) a reduced-scale decode must keep so the resize still only
        shrinks: the resize target (its shorter edge for shortest-edge resizing); None without resize."""
        if self.resize_to is None:
            return None
        kind, a, b = self.resize_to
        return (b, a) if kind == "square" else (a, a)

    def uint8_into(self, image: Image.Image, out: np.ndarray) -> None:
        """Resize + crop an RGB image into ``out`` (uint8 [3, h, w])."""
        h, w = self._resized(*image.size)
        if (w, h) != image.size:
            image = image.resize((w, h), self.resample)
        arr = np.asarray(image)
        if self.crop is not None:
            arr = self._center_crop(arr)
        np.copyto(out, arr.transpose(2, 0, 1))

    def _center_crop(self, arr: np.ndarray) -> np.ndarray:
        """transformers' ``center_crop`` on an HWC array, zero padding when the image is smaller."""
        ch, cw = self.crop
        oh, ow = arr.shape[:2]
        top, left = (oh - ch) // 2, (ow - cw) // 2
        if top >= 0 and left >= 0:
            return arr[top : top + ch, left : left + cw]
        nh, nw = max(ch, oh), max(cw, ow)
        padded = np.zeros((nh, nw, arr.shape[2]), arr.dtype)
        tp, lp = math.ceil((nh - oh) / 2), math.ceil((nw - ow) / 2)
        padded[tp : tp + oh, lp : lp + ow] = arr
        top, left = top + tp, left + lp
        return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]

    def normalise_into(self, pixels: np.ndarray, out: np.ndarray) -> None:
        """uint8 [N, 3, h, w] -> the processor's values in ``out`` (same shape, the table's dtype)."""
        for c in range(3):
            np.take(self.lut[c], pixels[:, c], out=out[:, c])

    def batch(self, images: list) -> torch.Tensor:
        """RGB PIL images (at least one; crop or square resize: one output shape) -> the processor's
        ``pixel_values``."""
        h, w = self.output_size(*images[0].size)
        u8 = np.empty((len(images), 3, h, w), np.uint8)
        for k, im in enumerate(images):
            self.uint8_into(im, u8[k])
        out = np.empty(u8.shape, self.lut.dtype)
        self.normalise_into(u8, out)
        return torch.from_numpy(out)


def pixel_steps(processor) -> ProcessorPixels | None:
    """The processor's steps, or None when it has a setting outside the plain resize / crop /
    rescale / normalise path (padding, RGB conversion off, a longest-edge rule, an unknown filter)."""
    def g(key: str, default=None):
        return getattr(processor, key, default)

    if not g("do_convert_rgb", True) or g("do_pad") or g("do_reduce_labels"):
        return None
    resize_to = None
    if g("do_resize", True):
        size = g("size")
        if any(_size_key(size, k) for k in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")):
            return None
        h, w, s = _size_key(size, "height"), _size_key(size, "width"), _size_key(size, "shortest_edge")
        if h and w:
            resize_to = ("square", int(h), int(w))
        elif s and g("do_center_crop", False):  # without the crop, images of a batch differ in size
            resize_to = ("shortest", int(s), 0)
        else:
            return None
    crop = None
    if g("do_center_crop", False):
        ch, cw = _size_key(g("crop_size"), "height"), _size_key(g("crop_size"), "width")
        if not (ch and cw):
            return None
        crop = (int(ch), int(cw))
    resample = g("resample", Image.Resampling.BILINEAR)
    try:
        resample = int(resample)
        Image.Resampling(resample)
    except (TypeError, ValueError):
        return None
    rescale = float(g("rescale_factor")) if g("do_rescale", False) else None
    mean = std = None
    if g("do_normalize", False):
        mean, std = g("image_mean"), g("image_std")
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(x) for x in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(x) for x in std]
        if len(mean) != 3 or len(std) != 3:
            return None
    return ProcessorPixels(resize_to, resample, crop, rescale, mean, std)


def check_images() -> list[Image.Image]:
    """Noise images of :data:`CHECK_SIZES` (deterministic)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in CHECK_SIZES]


def processor_pixels(processor) -> ProcessorPixels | None:
    """:func:`pixel_steps` if they give the processor's exact values on the check images, else None."""
    steps = pixel_steps(processor)
    if steps is None:
        return None
    try:
        for im in check_images():
            want = processor(images=[im], return_tensors="pt")["pixel_values"]
            got = steps.batch([im])
            if want.shape != got.shape or want.dtype != got.dtype or not torch.equal(want, got):
                return None
    except Exception:  # a processor that fails on the check images: keep using it as it is
        return None
    return steps
