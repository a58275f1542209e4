"""Pixels from DataLoader workers to the training process: one preprocessed buffer per batch, and
uint8 hand-over through reused shared memory.

A batch's images are preprocessed into one buffer that the collated batch uses as it is
(:func:`pixels_of`). Worker processes hand their batches over through shared memory, whose pages
cost far more to fill than the process's own (no transparent huge pages for shared memory), so a
float32 batch of large images is dear to hand over next to its decoding. So workers send the
resized images as uint8, a quarter of the bytes, through buffers they reuse (:class:`PixelSlots`),
and the main process rescales and normalises them (:func:`receive_from_worker`, the arithmetic of
:func:`vlmforge.images.preprocess_into`, so the values are bit-identical to a batch built in one
process). The packed and SFT loaders and `curate score` use it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.utils.data as tud
from PIL import Image

from vlmforge.images import preprocess_into

PREFETCH = 2  # batches each DataLoader worker prepares ahead (torch's default)


def resize_uint8_into(image, spec: dict, out: np.ndarray) -> None:
    """The first steps of :func:`vlmforge.images.preprocess_into` (RGB, bicubic resize, channels
    first) into a uint8 [3, size, size] array; :func:`normalise_pixels` does the rest."""
    size = int(spec["size"])
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    np.copyto(out, np.asarray(image).transpose(2, 0, 1))


def normalise_pixels(pixels: torch.Tensor, spec: dict) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 rescaled and normalised, with the operations and operand
    dtypes of :func:`vlmforge.images.preprocess_into` (bit-identical values); one image at a time,
    so the second and third pass find it in cache."""
    mean = np.asarray(spec["mean"], np.float32)
    std = np.asarray(spec["std"], np.float32)
    scale = (np.float32(spec.get("rescale", 1 / 255)) / std)[:, None, None]
    offset = (-mean / std)[:, None, None]
    src = pixels.numpy()
    out = np.empty(src.shape, dtype=np.float32)
    for k in range(src.shape[0]):
        np.copyto(out[k], src[k], casting="unsafe")
        out[k] *= scale
        out[k] += offset
    return torch.from_numpy(out)


def pixels_of(images: Sequence, spec: dict, as_uint8: bool = False, slots: PixelSlots | None = None) -> torch.Tensor:
    """Decoded images -> one [N, 3, size, size] buffer: preprocessed float32
    (:func:`vlmforge.images.preprocess_into`), or (``as_uint8``) resized uint8 images for
    :func:`normalise_pixels`, then written straight into a free buffer of ``slots`` when a worker
    has one."""
    size = int(spec["size"])
    shape = (len(images), 3, size, size)
    pixels = slots.reserve(shape) if as_uint8 and slots is not None else None
    out = pixels.numpy() if pixels is not None else np.empty(shape, dtype=np.uint8 if as_uint8 else np.float32)
    fill = resize_uint8_into if as_uint8 else preprocess_into
    for k, im in enumerate(images):
        fill(im, spec, out[k])
    return pixels if pixels is not None else torch.from_numpy(out)


class PixelSlots:
    """Shared-memory buffers that DataLoader workers reuse to hand uint8 pixels to the main process.

    A fresh shared-memory segment per batch pays a page fault on each of its pages (no huge pages
    for shared memory), so each worker cycles through ``per_worker`` buffers of its own. A buffer is
    busy from the worker's copy until the main process has normalised the batch
    (:func:`receive_from_worker`, before it asks for the next one); a worker that finds its buffers busy
    sends the batch in a fresh segment instead, so nothing waits and nothing is overwritten early.
    With DataLoader's in-order delivery a worker holds at most ``prefetch_factor`` batches the main
    process has not taken, so ``prefetch_factor + 2`` buffers are never all busy.

    Each buffer crosses to the main process once (:func:`send_from_worker`); later batches in it
    send only its number and their shape (:func:`receive_from_worker` views the buffer it mapped),
    since passing a segment's file descriptor again costs a socket round trip per batch."""

    def __init__(self, workers: int, per_worker: int):
        self.per_worker = int(per_worker)
        self.busy = torch.zeros(int(workers) * self.per_worker, dtype=torch.int32).share_memory_()
        self.buffers: dict[int, torch.Tensor] = {}  # a worker's own buffers (none in the main process)
        self.next = 0
        self.held: dict[int, torch.Tensor] = {}  # main process: the last tensor of each buffer, mapped once
        self.sent: dict[int, torch.Tensor] = {}  # a worker's buffers as last sent whole to the main process
        self.mapped: dict[int, torch.Tensor] = {}  # main process: each buffer as received, flat
        self.reserved: tuple[torch.Tensor, int] | None = None  # a worker's pixels written in place, not yet sent
        self._flags_of: tuple[int, np.ndarray] | None = None  # (pid, busy as numpy) of the process that made it

    def _flags(self) -> np.ndarray:
        """``busy`` as a numpy view, one per process: a tensor's scalar indexing costs microseconds."""
        if self._flags_of is None or self._flags_of[0] != os.getpid():
            self._flags_of = (os.getpid(), self.busy.numpy())
        return self._flags_of[1]

    def _take(self, nbytes: int) -> tuple[torch.Tensor, int] | None:
        """In a worker: a free buffer of at least ``nbytes`` (grown if need be), now busy, and its
        number; None when all are busy, or outside a worker."""
        info = tud.get_worker_info()
        if info is None:
            return None
        busy = self._flags()
        for step in range(self.per_worker):
            k = (self.next + step) % self.per_worker
            slot = info.id * self.per_worker + k
            if busy[slot] == 0:
                break
        else:
            return None
        self.next = (k + 1) % self.per_worker
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self.buffers[slot] = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8).share_memory_()
        busy[slot] = 1
        return buf, slot

    def reserve(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """In a worker: a uint8 tensor of ``shape`` in a free buffer, to write a batch's pixels into
        directly (:meth:`put` then sends it without a copy); None when all are busy, or outside a
        worker. A reservation that :meth:`put` did not take is freed by the next one."""
        if self.reserved is not None:
            self._flags()[self.reserved[1]] = 0
            self.reserved = None
        taken = self._take(int(np.prod(shape)))
        if taken is None:
            return None
        buf, slot = taken
        # a tensor of its own on the buffer's storage (not a view of it): the collator then hands
        # over this very tensor as the batch's pixels, as it does a buffer of the batch's own
        pixels = torch.empty(0, dtype=torch.uint8).set_(buf.untyped_storage(), 0, tuple(shape))
        self.reserved = (pixels, slot)
        return pixels

    def put(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """In a worker: ``pixels`` copied into a free buffer of this worker (or left where they are,
        if :meth:`reserve` gave them), and the buffer's number (-1 and ``pixels`` itself when all
        are busy, or outside a worker)."""
        if self.reserved is not None and self.reserved[0] is pixels:
            slot = self.reserved[1]
            self.reserved = None
            return pixels, slot
        taken = self._take(pixels.numel())
        if taken is None:
            return pixels, -1
        buf, slot = taken
        out = buf[: pixels.numel()].view(pixels.shape)
        out.copy_(pixels)
        return out, slot

    def release(self, slot: int, pixels: torch.Tensor) -> None:
        """In the main process, once ``pixels`` (from buffer ``slot``) is no longer read."""
        if slot >= 0:
            self.held[slot] = pixels  # keeps the mapping: the next batch in this buffer maps nothing new
            self._flags()[slot] = 0


def send_from_worker(batch: dict, slots: PixelSlots) -> dict:
    """In a worker, a collated batch as it crosses to the main process: the uint8 pixels in one of
    the worker's shared buffers, the other tensors as numpy arrays (pickled through the pipe: a
    shared-memory segment per small tensor costs more than its bytes)."""
    out = {}
    for key, value in batch.items():
        if key == "pixel_values":
            out[key], slot = slots.put(value)
            out["pixel_slot"] = slot
            if slot >= 0 and slots.sent.get(slot) is slots.buffers[slot]:  # the main process has it mapped
                out["pixel_shape"] = tuple(out[key].shape)
                out[key] = None
            elif slot >= 0:
                slots.sent[slot] = slots.buffers[slot]
        else:
            out[key] = value.numpy() if isinstance(value, torch.Tensor) else value
    return out


def receive_from_worker(batch: dict, spec: dict, slots: PixelSlots) -> dict:
    """In the main process, the training batch from what :func:`send_from_worker` sent: tensors
    back, the uint8 pixels rescaled and normalised (in a new buffer) and the worker's buffer freed."""
    slot = int(batch.pop("pixel_slot", -1))
    shape = batch.pop("pixel_shape", None)
    out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    if shape is not None:  # in the worker's buffer that came with an earlier batch
        out["pixel_values"] = slots.mapped[slot][: int(np.prod(shape))].view(shape)
    elif slot >= 0 and out.get("pixel_values") is not None:
        slots.mapped[slot] = torch.empty(0, dtype=torch.uint8).set_(out["pixel_values"].untyped_storage())
    pv = out.get("pixel_values")
    if pv is not None and pv.dtype == torch.uint8:
        out["pixel_values"] = normalise_pixels(pv, spec)
    slots.release(slot, pv)
    return out
