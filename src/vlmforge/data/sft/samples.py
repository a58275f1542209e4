"""SFT samples: record ``i`` of an SFT index -> ``{"input_ids", "labels", "pixel_values"}``.

The chat template is applied with the loss only on assistant turns (reply + end-of-turn token;
rendered once per conversation shape, :class:`vlmforge.text.chat_shapes.ConversationEncoder`, with
the template's own ids and mask), each ``<image>`` becomes ``visual_tokens`` image-token ids with
label -100, and the first token is -100 (nothing learns to predict across a sample boundary).
Under a dynamic image layout
(:class:`vlmforge.arch.tiles.ImageLayout` with tiles or a start/end wrap) the k-th ``<image>``
becomes image k's wrap and ``tiles x tokens_per_tile`` placeholders (its decoded size picks the
grid; label -100 on all of them), and ``pixel_values`` holds every tile in order, thumbnail last
(:func:`vlmforge.images.tile_images`). With ``verdicts`` (stage ``prm``, see
:mod:`.verdicts`) only the verdict token of each assistant turn is supervised, and a turn that is
not one ``+`` / ``-`` token is a bad sample (``bad_verdict``). A bad sample raises
:class:`SFTDataError` with its ``reason``; the loader skips and counts it.

Each record knows its source (``file_id``): the folder its image paths are relative to (a meta
file's ``root``, else ``image_root``) and whether its images get random JPEG quality in training
(a meta file's ``data_augment``, else ``jpeg_augment``; :mod:`.augment`), and its tile budget (a
meta file's ``max_dynamic_patch``, else the layout's ``max_tiles``). JPEG augmentation re-encodes
each tile (InternVL's order: tile, then augment), tile k of the sample at its own drawn quality;
without tiling a tile is an image, as before.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from vlmforge.arch.tiles import ImageLayout
from vlmforge.data.collate import IGNORE_INDEX
from vlmforge.data.sft.augment import jpeg_augment as reencode_jpeg
from vlmforge.data.sft.index import SFTIndex, open_index
from vlmforge.data.sft.parallel import image_size
from vlmforge.data.sft.records import SFTDataError
from vlmforge.data.sft.verdicts import VerdictError, end_of_turn_ids, verdict_mask
from vlmforge.files import PathOutsideRootError, resolve_inside
from vlmforge.imagedecode import ImageDecodeError, ImageTooLargeError, decode_image
from vlmforge.images import preprocess, preprocess_batch, tile_images
from vlmforge.text.chat import encode_conversation
from vlmforge.text.chat_shapes import ConversationEncoder
from vlmforge.text.tokenization import image_token_id


def read_image(path: str):
    """Image file -> decoded RGB ``PIL.Image``; SFTDataError(reason missing_image | bad_image |
    image_too_large)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SFTDataError(f"image file not found: {path}", "missing_image") from None
    try:
        return decode_image(data)
    except ImageTooLargeError as e:
        raise SFTDataError(f"{path}: {e}", "image_too_large") from None
    except ImageDecodeError as e:
        raise SFTDataError(f"image does not decode: {path}: {e}", "bad_image") from None


def conversation_sample(tokenizer, messages: list[dict], *, image_id: int, visual_tokens: int | None = None,
                        verdicts: tuple[int, int] | None = None, end_ids: set[int] | None = None,
                        layout: ImageLayout | None = None,
                        sizes: list[tuple[int, int]] | None = None,
                        encoder: ConversationEncoder | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(input_ids with every ``<image>`` expanded to ``visual_tokens`` ids, labels, images marked) of
    one conversation: labels are the ids on assistant replies (with ``verdicts``: on each turn's
    verdict token only; VerdictError naming the turn when a reply is not one verdict), -100 elsewhere
    and on the first token. What SFT and PRM training learn, and where ``prm-score`` reads.

    ``layout`` (instead of ``visual_tokens``): image k becomes ``layout.expand``'s wrap and
    placeholders for ``sizes[k]`` (its (width, height); needed with tiles). When the markers and
    ``sizes`` disagree in number nothing is expanded (the caller compares the count returned).
    ``encoder``: a :class:`~vlmforge.text.chat_shapes.ConversationEncoder` of ``tokenizer`` (the
    same ids and mask as the chat template, for less work per conversation)."""
    ids, mask = encoder(messages) if encoder is not None else encode_conversation(tokenizer, messages)
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask, dtype=bool)
    if verdicts is not None:
        mask = verdict_mask(tokenizer, ids, mask, verdicts, end_ids)
    is_img = ids == image_id
    n_img = int(is_img.sum())
    labels = np.where(mask & ~is_img, ids, IGNORE_INDEX)
    if layout is not None and layout.dynamic:
        if sizes is None:
            if layout.needs_sizes and n_img:
                raise ValueError("a tiled layout needs the images' sizes")
            sizes = [(1, 1)] * n_img
        if n_img and n_img == len(sizes):
            ids, labels = layout.expand(ids, image_id, list(sizes), labels)
    else:
        vt = layout.tokens_per_tile if layout is not None else int(visual_tokens)
        if n_img and vt != 1:
            reps = np.where(is_img, vt, 1)
            ids, labels = np.repeat(ids, reps), np.repeat(labels, reps)
    if labels.size:
        labels[0] = IGNORE_INDEX
    return ids, labels, n_img


def load_pixels(path: str, spec: dict) -> torch.Tensor:
    """Image file -> FloatTensor[3, size, size]; SFTDataError as :func:`read_image`."""
    return preprocess(read_image(path), spec)


class SFTDataset:
    """Map-style SFT samples over an index. ``dataset[i]`` raises :class:`SFTDataError` (with
    ``.reason``) on a bad sample; :class:`SFTLoader` skips and counts those."""

    def __init__(
        self,
        index: SFTIndex | str | os.PathLike,
        tokenizer,
        *,
        visual_tokens: int | None = None,
        layout: ImageLayout | None = None,
        image_spec: dict | None = None,
        image_root: str | os.PathLike | None = None,
        max_len: int | None = None,
        allow_absolute_paths: bool = False,
        verdicts: tuple[int, int] | None = None,
        jpeg_augment: bool = False,
    ):
        self.index = index if isinstance(index, SFTIndex) else open_index(index)
        self.tok = tokenizer
        # the model's image layout (``image_layout(recipe.model, tokenizer)``); default: a fixed grid
        # of ``visual_tokens``, else the one the index was built for
        if layout is None:
            layout = ImageLayout(int(visual_tokens)) if visual_tokens else self.index.layout
        problem = self.index.layout_problem(layout)
        if problem:
            raise SFTDataError(problem, "layout_mismatch")
        self.layout = layout
        self.dynamic = layout is not None and layout.dynamic
        self.visual_tokens = int(layout.tokens_per_tile)
        self.image_spec = image_spec
        self.image_root = str(image_root) if image_root is not None else (self.index.image_root or "")
        self.max_len = max_len
        # image paths stay inside image_root (symlinks resolved) unless the index or the caller opted in
        self.allow_absolute_paths = bool(allow_absolute_paths or self.index.manifest.get("allow_absolute_paths"))
        self._dirs: dict[str, str] = {}
        # per source file: its image root and whether its images are JPEG-augmented in training.
        # A meta file's source brings both; a plain record file uses image_root and jpeg_augment.
        info = self.index.source_info or [{} for _ in self.index.sources]
        from_meta = [bool(s.get("meta_file")) for s in info]
        self._meta_roots = [s["image_root"] if m else None for s, m in zip(info, from_meta)]
        self._augment = np.array([bool(s.get("data_augment")) if m else bool(jpeg_augment)
                                  for s, m in zip(info, from_meta)], dtype=bool)
        # a meta source's max_dynamic_patch is its tile budget (as at index time)
        self._layouts = [layout.with_max_tiles(s.get("max_dynamic_patch")) for s in info]
        self.image_id = image_token_id(tokenizer)
        # every conversation through the chat template's pieces, rendered once per shape
        self.chat = ConversationEncoder(tokenizer)
        # stage prm: (id of '+', id of '-'); only those tokens are supervised
        self.verdicts = tuple(verdicts) if verdicts is not None else None
        self._end_ids = end_of_turn_ids(tokenizer) if verdicts is not None else None

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> np.ndarray:
        """Multimodal length of every record (from the index; exact if it was built exact)."""
        return self.index.mm_length if self.index.dynamic else self.index.mm_lengths(self.visual_tokens)

    def visual_lengths(self) -> np.ndarray:
        """Visual tokens (placeholders and wraps) of every record, from the index."""
        return self.index.visual_lengths(self.visual_tokens)

    def tokens(self, i: int, sizes: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(input_ids with images expanded, labels, image paths) of record ``i``; no image I/O on a
        fixed grid. A tiled layout needs the images' (width, height): ``sizes``, else read from the
        files' headers."""
        msgs, images = self.index.messages(i)
        if self.layout.needs_sizes and images and sizes is None:
            try:
                sizes = [image_size(str(p)) for p in self._paths(i, images)]
            except (PathOutsideRootError, SFTDataError) as e:
                raise SFTDataError(f"{self.index.where(i)}: {e}", e.reason) from None
        return (*self._encode(i, msgs, images, sizes), images)

    def _encode(self, i: int, msgs: list[dict], images: list[str],
                sizes: list[tuple[int, int]] | None) -> tuple[np.ndarray, np.ndarray]:
        try:
            ids, labels, n_img = conversation_sample(self.tok, msgs, image_id=self.image_id,
                                                     layout=self._layouts[int(self.index.file_id[i])], sizes=sizes,
                                                     verdicts=self.verdicts, end_ids=self._end_ids, encoder=self.chat)
        except VerdictError as e:  # a reply that is not one verdict token (stage prm)
            raise SFTDataError(f"{self.index.where(i)}: {e}", "bad_verdict") from None
        if n_img != len(images):
            raise SFTDataError(
                f"{self.index.where(i)}: {n_img} {self.tok.convert_ids_to_tokens(self.image_id)} token(s) "
                f"for {len(images)} image(s)",
                "image_token_mismatch",
            )
        if self.max_len is not None and ids.size > self.max_len:
            raise SFTDataError(f"{self.index.where(i)}: {ids.size} tokens > max_len {self.max_len}", "too_long")
        return ids, labels

    def _paths(self, i: int, images: list[str]) -> list:
        root = self._meta_roots[int(self.index.file_id[i])] or self.image_root
        return [resolve_inside(root or ".", p, allow_absolute=self.allow_absolute_paths, dir_cache=self._dirs)
                for p in images]

    def source(self, i: int) -> dict | None:
        """The manifest's ``sources`` entry of record ``i``'s file (name, image root, repeat_time,
        data_augment, max_dynamic_patch, counts); None for an index written before meta files."""
        info = self.index.source_info
        return info[int(self.index.file_id[i])] if info is not None else None

    def augments(self, i: int) -> bool:
        """Whether record ``i``'s images get random JPEG quality in training."""
        return bool(self._augment[int(self.index.file_id[i])])

    def decoded(self, i: int, augment: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, list]:
        """(input_ids, labels, tower inputs) of record ``i``: the decoded RGB images, or under tiling
        their tiles in order (thumbnail after each image's grid); SFTDataError names the record.

        ``augment``: (seed, epoch) of a training batch; the tiles of a source that asks for it are
        re-encoded at their drawn JPEG quality (:mod:`.augment`). None (the default): never."""
        msgs, images = self.index.messages(i)
        if not self.layout.needs_sizes:  # the text's checks (too long, markers) before any image I/O, as always
            ids, labels = self._encode(i, msgs, images, None)
        if images and self.image_spec is None:
            raise ValueError("this SFT data has images: pass image_spec (vlmforge.arch.geometry.image_preprocess_spec)")
        try:
            decoded = [read_image(str(p)) for p in self._paths(i, images)]
        except (PathOutsideRootError, SFTDataError) as e:
            raise SFTDataError(f"{self.index.where(i)}: {e}", e.reason) from None
        if self.layout.needs_sizes:  # the decoded sizes pick each image's grid
            ids, labels = self._encode(i, msgs, images, [im.size for im in decoded])
        tiles = tile_images(decoded, self._layouts[int(self.index.file_id[i])])
        if augment is not None and tiles and self.augments(i):
            tiles = reencode_jpeg(tiles, augment[0], augment[1], int(i))
        return ids, labels, tiles

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, labels, images = self.decoded(i)
        pixel_values = preprocess_batch(images, self.image_spec) if images else None
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}
