"""Packed shards -> training batches, split across ranks and workers, exactly resumable.

``caption_sample`` / ``text_sample`` build samples in the pack layout ``<image> x N, caption,
<|im_end|>`` and ``text, <|im_end|>`` (the collator's form, :mod:`vlmforge.data.collate`).

:class:`PackedDataset` is map-style over every pack of a packed folder (each shard's small index
gives byte offsets, so memory stays light and any pack is one seek away). Item ``i`` is a pack:
a list of samples in the collator's form, each image expanded into N ``<image>`` ids (N checked
against the model), images decoded and preprocessed for the vision encoder.

:class:`PackedLoader` plans each epoch as a pure function of (seed, epoch, number of packs):
a seeded permutation of all packs, cut into global batches of ``batch_size x world_size`` packs;
rank r takes the r-th slice of every global batch. So ranks see disjoint packs that together
cover the epoch, every rank gets the same number of batches (no DDP hang) and nobody gets zero,
however few shards there are. The incomplete last global batch is either filled with packs
from the start of the epoch (``remainder="wrap"``, the default: every pack is seen, a few twice)
or left out (``"drop"``; with fewer packs than one global batch it wraps anyway). DataLoader
workers take the rank's batches round-robin and torch returns them in order, so the batch order
does not depend on ``num_workers``. ``state_dict()`` = {epoch, batch consumed}; after
``load_state_dict`` the loader yields exactly the batches it would have yielded next.

Rank balancing (``balance_micro_steps=m``): the same seeded epoch order is cut into optimizer
steps of ``world_size x m x batch_size`` packs, and each step is dealt to (rank, micro-step, slot)
by :class:`vlmforge.data.balance.StepPlanner` on every pack's (image tokens, tokens), read from the
shard indexes; rank r yields its slots in micro-step order. The main process plans a step when
its first batch is asked for (the DataLoader's batch sampler, so workers plan nothing), never the
whole epoch up front. A step's plan depends on that step's packs alone, so resume stays exact, and
a step trains the same packs whatever the split into ranks x micro-steps. The epoch is then whole
steps (``remainder`` as above, per step).

Image layouts (a folder packed with ``model.images.tiles`` or a wrap, format 2): each image
sample records its image's size and tiles; the loader cuts the tiles with
:func:`vlmforge.images.tile_images` (the sample's pixel rows, thumbnail last) and writes the
image's wrap and ``tiles x tokens_per_tile`` placeholders with the folder's
:class:`~vlmforge.arch.tiles.ImageLayout`, which must be the recipe's.

A pack's images are preprocessed into one buffer that the collated batch uses as it is; worker
processes hand batches over as uint8 through reused shared buffers (:mod:`vlmforge.data.pixels`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data as tud

from vlmforge import dist
from vlmforge.arch.geometry import (
    image_layout,
    image_preprocess_spec,
    visual_tokens_per_image,
    wrap_ids,
)
from vlmforge.arch.tiles import ImageLayout, layout_mismatch
from vlmforge.arch.tokens import IM_END, IMAGE_TOKEN
from vlmforge.config.recipe import Recipe, run_seed
from vlmforge.data.balance import StepPlanner
from vlmforge.data.collate import IGNORE_INDEX, collate_packs
from vlmforge.data.pixels import PREFETCH, PixelSlots, pixels_of, receive_from_worker, send_from_worker
from vlmforge.data.pretrain.packed_shards import PackedShardReader, list_packed_shards
from vlmforge.errors import ConfigError, UserError
from vlmforge.imagedecode import ImageDecodeError, decode_image
from vlmforge.images import tile_images

log = logging.getLogger(__name__)

REMAINDER = ("wrap", "drop")


class PackedDataError(UserError, ValueError):
    """A packed folder that does not match the model or is damaged (a user error: one line, no traceback)."""


# ----------------------------------------------------------------------------- samples (pack layout)


def caption_sample(
    caption_ids: Sequence[int],
    *,
    image_token_id: int,
    num_visual_tokens: int,
    sep_id: int,
    supervise_sep: bool = True,
    pixel_values: torch.Tensor | None = None,
    image_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """``<image> x N + caption + <|im_end|>``; labels ignore the visual tokens (and the separator if unsupervised).
    ``image_ids``: the image's ids as an :class:`~vlmforge.arch.tiles.ImageLayout` expands them
    (wrap + tiles x placeholders) in place of ``<image> x num_visual_tokens``; ignored by the labels too."""
    cap = np.asarray(caption_ids, dtype=np.int64)
    if image_ids is None:
        image_ids = np.full(num_visual_tokens, image_token_id, np.int64)
    ids = np.concatenate([np.asarray(image_ids, np.int64), cap, np.array([sep_id], np.int64)])
    labels = ids.copy()
    labels[: len(image_ids)] = IGNORE_INDEX
    if not supervise_sep:
        labels[-1] = IGNORE_INDEX
    out: dict[str, Any] = {"input_ids": ids, "labels": labels}
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    return out


def text_sample(
    text_ids: Sequence[int], *, sep_id: int, supervise_sep: bool = True, add_sep: bool = True
) -> dict[str, Any]:
    """Text-only sample (mixed-in corpus): ``text + <|im_end|>`` (no separator mid-document: add_sep=False)."""
    ids = np.asarray(text_ids, dtype=np.int64)
    if add_sep:
        ids = np.concatenate([ids, np.array([sep_id], np.int64)])
    labels = ids.copy()
    if add_sep and not supervise_sep:
        labels[-1] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------------- dataset


class PackedDataset:
    def __init__(
        self,
        folder: str,
        *,
        visual_tokens: int | None = None,
        image_spec: dict | None = None,
        supervise_sep: bool = True,
        strict: bool = False,
        expected_layout: dict | None = None,
    ):
        """``expected_layout``: the recipe's layout record (:func:`recipe_layout`); a folder packed
        with another layout is refused, naming both. None: the folder's own layout, unchecked."""
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise PackedDataError(f"{manifest_path} not found: is {folder} a `vlmforge pack` output?")
        with open(manifest_path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        geo = self.manifest["geometry"]
        self.max_len = int(geo["max_len"])
        self.visual_tokens = int(geo["visual_tokens"])
        if visual_tokens is not None and int(visual_tokens) != self.visual_tokens:
            raise PackedDataError(
                f"{folder} was packed with {self.visual_tokens} visual tokens per image but the model "
                f"makes {visual_tokens}: re-run `vlmforge pack` with this model section"
            )
        # a folder without a layout record is a fixed-grid pack: one tile per image, no wrap
        self.layout_record = geo.get("images") or {"tiles": False, "tokens_per_tile": self.visual_tokens,
                                                   "start": None, "end": None, "start_ids": [], "end_ids": []}
        if expected_layout is not None and layout_mismatch(expected_layout, self.layout_record):
            raise PackedDataError(
                f"{folder} was packed with image layout [{_describe(self.layout_record)}] but the recipe's model "
                f"has [{_describe(expected_layout)}]: re-run `vlmforge pack` with this model section"
            )
        self.layout = ImageLayout.from_record(self.layout_record)
        self.records_sizes = "images" in geo  # per-sample sizes and tiles recorded (format 2)
        self.image_token_id, self.sep_id, self.pad_id = int(geo["image_token_id"]), int(geo["sep_id"]), int(geo["pad_id"])
        self.image_spec = dict(image_spec or geo["image_preprocess"])
        self.supervise_sep = supervise_sep
        self.strict = strict
        self.readers = [PackedShardReader(p) for p in list_packed_shards(self.folder)]
        self.offsets = np.cumsum([0] + [len(r) for r in self.readers])
        self.skipped = 0  # images that failed to decode (this process only)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def pack_loads(self) -> tuple[np.ndarray, np.ndarray]:
        """(image tokens, tokens) of every pack, from the shard indexes (no pack is read): the
        placeholders + wrap of its images, and its whole length (what the LLM runs on)."""
        vision, llm = [], []
        for r in self.readers:
            fixed = r.n_images * self.visual_tokens
            vision.append(np.where(r.image_tokens >= 0, r.image_tokens, fixed))
            llm.append(r.lengths)
        return np.concatenate(vision), np.concatenate(llm)

    def pack_length(self, i: int) -> int:
        r, j = self._locate(i)
        return int(self.readers[r].lengths[j])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"pack {i} out of range ({len(self)} packs)")
        r = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return r, i - int(self.offsets[r])

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return self.load(i)

    def load(self, i: int, as_uint8: bool = False) -> list[dict[str, Any]]:
        """Pack ``i`` (``as_uint8``: its images resized but not normalised, see :func:`pixels_of`)."""
        r, j = self._locate(int(i))
        meta, tokens, images = self.readers[r].read_pack(j)
        kept, decoded, at, img = [], [], 0, 0
        for s in meta["samples"]:
            ids = tokens[at : at + s["n_text"]]
            at += s["n_text"]
            if s["kind"] == "text":
                kept.append((s, ids, 0))
                continue
            data = images[img]
            img += 1
            where = f"{self.readers[r].tar_path} pack {j} sample {s['key']!r}"
            try:
                image = decode_image(data)
                tiles = self._tiles(image, s, where) if self.records_sizes else [image]
            except ImageDecodeError as e:
                if self.strict:
                    raise PackedDataError(f"{where}: {e}") from e
                self.skipped += 1
                log.warning("skipping %s: %s", where, e)
                continue
            decoded += tiles
            kept.append((s, ids, len(tiles)))
        # All images of the pack go into one buffer; samples hold consecutive views of it, so
        # collating a one-pack batch needs no copy.
        pixels = pixels_of(decoded, self.image_spec, as_uint8) if decoded else torch.zeros(0)
        samples, k = [], 0
        for s, ids, n in kept:
            if s["kind"] == "text":
                samples.append(text_sample(ids, sep_id=self.sep_id, supervise_sep=self.supervise_sep,
                                           add_sep=bool(s["sep"])))
            else:
                block = self.layout.expand([self.image_token_id], self.image_token_id,
                                           [tuple(s["size"])]) if self.records_sizes else None
                samples.append(caption_sample(ids, image_token_id=self.image_token_id,
                                              num_visual_tokens=self.visual_tokens, sep_id=self.sep_id,
                                              supervise_sep=self.supervise_sep, pixel_values=pixels[k : k + n],
                                              image_ids=block))
                k += n
        if not samples:  # every image of the pack failed: keep the row valid with a lone separator
            samples.append(text_sample([], sep_id=self.sep_id))
        return samples


    def _tiles(self, image, s: dict, where: str) -> list:
        """The tower inputs of an image sample packed under a layout; its placeholders were counted
        from the recorded size, so a decode of another size (or another tile count) is damage."""
        if tuple(image.size) != tuple(s["size"]):
            raise ImageDecodeError(f"image is {image.width}x{image.height} but was packed as {s['size'][0]}x{s['size'][1]}")
        tiles = tile_images([image], self.layout)
        if len(tiles) != int(s["tiles"]):
            raise PackedDataError(f"{where}: {len(tiles)} tiles but {s['tiles']} were packed: damaged pack")
        return tiles


def _describe(record: dict) -> str:
    return ImageLayout.from_record(record).describe(record.get("start"), record.get("end"))


def recipe_layout(cfg: Recipe, tokenizer: Any = None) -> dict:
    """The layout record of a recipe's model (:meth:`vlmforge.arch.tiles.ImageLayout.record`);
    without a tokenizer a wrap is compared by its text only (its ids: :func:`_check_tokenizer`)."""
    images = cfg.model.images
    if tokenizer is not None or not (images.start or images.end):
        return image_layout(cfg.model, tokenizer).record(images.start, images.end)
    bare = image_layout(cfg.model, wrap=False)  # the wrap's ids need the tokenizer
    return {**bare.record(images.start, images.end), "start_ids": None, "end_ids": None}


class _WorkerPacks(tud.Dataset):
    """The packs as DataLoader workers read them: images resized, as uint8 (see the module docstring)."""

    def __init__(self, dataset: PackedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset.load(i, as_uint8=True)


class _Collate:
    """Picklable collate_fn (DataLoader workers under spawn); in workers the pixels go to ``slots``."""

    def __init__(self, pad_id: int, pad_to: int | None, positions: str, slots: PixelSlots | None = None):
        self.pad_id, self.pad_to, self.positions, self.slots = pad_id, pad_to, positions, slots

    def __call__(self, packs):
        batch = collate_packs(packs, self.pad_id, pad_to=self.pad_to, positions=self.positions)
        return batch if self.slots is None else send_from_worker(batch, self.slots)


class _Batches:
    """The batch sampler of one pass: ``items`` (a batch's pack ids each, or keys that ``make`` turns
    into them when the DataLoader asks for the batch)."""

    def __init__(self, items, make=None):
        self.items, self.make = items, make

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items) if self.make is None else map(self.make, self.items)


class PackedLoader:
    """Batches of ``batch_size`` packs for this rank; see the module docstring for the split and resume.

    ``dataset`` is a :class:`PackedDataset`, or a packed folder together with a recipe ``cfg``
    (the dataset is then built against the recipe's model geometry, and unset options come from
    ``cfg.data`` / ``cfg.train.micro_batch_size`` / the recipe seed). A ``tokenizer``, if given,
    is checked against the token ids the folder was packed with. ``balance_micro_steps``: deal
    each optimizer step of ``world_size x balance_micro_steps x batch_size`` packs to ranks and
    micro-steps by their loads (see the module docstring); None: today's round-robin split.
    """

    def __init__(
        self,
        dataset: PackedDataset | str,
        cfg: Recipe | None = None,
        *,
        tokenizer: Any = None,
        batch_size: int | None = None,
        seed: int | None = None,
        shuffle: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int | None = None,
        remainder: str | None = None,
        pad_to: int | None = None,
        positions: str | None = None,
        balance_micro_steps: int | None = None,
    ):
        if not isinstance(dataset, PackedDataset):
            if cfg is None:
                raise ValueError("PackedLoader(path) needs the recipe: PackedLoader(path, cfg, ...)")
            dataset = dataset_from_recipe(cfg, str(dataset), tokenizer)
        if cfg is not None:
            d = cfg.data
            batch_size = int(cfg.train.micro_batch_size) if batch_size is None else batch_size
            seed = run_seed(cfg) if seed is None else seed
            shuffle = d.shuffle if shuffle is None else shuffle
            num_workers = d.num_workers if num_workers is None else num_workers
            remainder = d.remainder if remainder is None else remainder
            positions = d.positions if positions is None else positions
            if pad_to is None and d.pad_to_max_len:
                pad_to = dataset.max_len
        if tokenizer is not None:
            _check_tokenizer(tokenizer, dataset)
        batch_size = 1 if batch_size is None else int(batch_size)
        if rank is None or world_size is None:
            rank, world_size = dist.rank(), dist.world_size()
        remainder = remainder or "wrap"
        if remainder not in REMAINDER:
            raise ValueError(f"remainder must be one of {REMAINDER}, got {remainder!r}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        if balance_micro_steps is not None and int(balance_micro_steps) < 1:
            raise ValueError(f"balance_micro_steps must be >= 1 or None, got {balance_micro_steps}")
        if len(dataset) == 0:
            raise PackedDataError(f"{dataset.folder} holds no packs")
        self.dataset = dataset
        self.batch_size, self.seed = batch_size, int(seed or 0)
        self.shuffle = True if shuffle is None else bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.remainder = int(num_workers or 0), remainder
        self.collate = _Collate(dataset.pad_id, pad_to, positions or "restart")
        self.epoch, self.batch = 0, 0  # batch = batches of this epoch already handed out
        self.balance_micro_steps = None if balance_micro_steps is None else int(balance_micro_steps)
        self.loads = dataset.pack_loads() if self.balance_micro_steps else None
        self._planner: tuple[int, StepPlanner] | None = None  # (epoch, the steps of that epoch, planned lazily)

    # -- plan ---------------------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        n, g = len(self.dataset), self.batch_size * self.world_size
        m = self.balance_micro_steps or 1  # balanced: whole optimizer steps of m micro-batches
        if self.remainder == "drop" and n >= g * m:
            return n // (g * m) * m
        return math.ceil(n / (g * m)) * m

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's pack ids over all ranks, ``batches_per_epoch() x batch_size x world_size`` of them."""
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return np.resize(order, self.batches_per_epoch() * self.batch_size * self.world_size)  # wrap: repeats

    def step_planner(self, epoch: int) -> StepPlanner:
        """The balanced steps of ``epoch`` (balancing on), each planned when first read."""
        if self._planner is None or self._planner[0] != epoch:
            vision, llm = self.loads
            planner = StepPlanner(vision, llm, self._order(epoch), self.world_size, self.balance_micro_steps,
                                  self.batch_size)
            self._planner = (int(epoch), planner)
        return self._planner[1]

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """[batches, batch_size] pack indices this rank reads in ``epoch``. Balanced, this plans every
        step of the epoch (for inspection; iterating plans only the steps it reads)."""
        if self.balance_micro_steps is None:
            nb = self.batches_per_epoch()
            return self._order(epoch).reshape(nb, self.world_size, self.batch_size)[:, self.rank, :]
        planner = self.step_planner(epoch)
        return np.stack([planner.rank_batch(self.rank, j) for j in range(self.batches_per_epoch())])

    def _batches(self, epoch: int, start: int) -> _Batches:
        if self.balance_micro_steps is None:
            return _Batches(self.epoch_plan(epoch)[start:].tolist())
        planner = self.step_planner(epoch)
        return _Batches(range(start, self.batches_per_epoch()), lambda j: planner.rank_batch(self.rank, j).tolist())

    # -- iterate ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (no-op if it is already the current epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch (empty if it is used up); afterwards the next epoch is current."""
        batches = self._batches(self.epoch, self.batch)
        workers = self.num_workers > 0
        slots = PixelSlots(self.num_workers, PREFETCH + 2) if workers else None
        c = self.collate
        dl = tud.DataLoader(
            _WorkerPacks(self.dataset) if workers else self.dataset,
            batch_sampler=batches,
            collate_fn=_Collate(c.pad_id, c.pad_to, c.positions, slots),
            num_workers=self.num_workers,
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=False,
        )
        for batch in dl:
            self.batch += 1
            yield receive_from_worker(batch, self.dataset.image_spec, slots) if workers else batch
        self.epoch, self.batch = self.epoch + 1, 0

    # -- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        state = {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "num_packs": len(self.dataset),
                 "world_size": self.world_size, "batch_size": self.batch_size}
        if self.balance_micro_steps is not None:  # unbalanced states keep exactly their keys of before
            state["balance_micro_steps"] = self.balance_micro_steps
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_packs", len(self.dataset)), ("world_size", self.world_size),
                          ("batch_size", self.batch_size), ("seed", self.seed)):
            if key in state and int(state[key]) != mine:
                raise PackedDataError(f"loader state has {key}={state[key]} but this run has {mine}: cannot resume exactly")
        if state.get("balance_micro_steps") != self.balance_micro_steps:
            raise PackedDataError(f"loader state has balance_micro_steps={state.get('balance_micro_steps')} but this "
                                  f"run has {self.balance_micro_steps}: the packs' order differs, cannot resume exactly")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def _check_tokenizer(tok, ds: PackedDataset) -> None:
    for _name, token, packed in (("image", IMAGE_TOKEN, ds.image_token_id), ("separator", IM_END, ds.sep_id)):
        tid = tok.convert_tokens_to_ids(token)
        if tid != packed:
            raise PackedDataError(
                f"{ds.folder} was packed with {token} = id {packed} but this tokenizer has {tid}: "
                f"re-pack with the model's tokenizer"
            )
    rec = ds.layout_record
    for side in ("start", "end"):
        ids = list(wrap_ids(tok, rec.get(side)))
        if ids != list(rec.get(f"{side}_ids") or []):
            raise PackedDataError(f"{ds.folder} was packed with the image {side} {rec.get(side)!r} = ids "
                                  f"{rec.get(f'{side}_ids')} but this tokenizer makes {ids}: re-pack with the model's tokenizer")


def dataset_from_recipe(cfg: Recipe, data_path: str | None = None, tokenizer: Any = None) -> PackedDataset:
    """The packed dataset of ``data_path`` (default train.data_path), checked against the recipe's model
    (visual tokens, image layout; with ``tokenizer``, the wrap's ids too)."""
    path = data_path or cfg.train.data_path
    if not path:
        raise ConfigError("train.data_path: no packed data folder given (run `vlmforge pack` first)")
    d = cfg.data
    return PackedDataset(path, visual_tokens=visual_tokens_per_image(cfg.model),
                         image_spec=image_preprocess_spec(cfg.model), supervise_sep=d.supervise_sep, strict=d.strict,
                         expected_layout=recipe_layout(cfg, tokenizer))


def build_pretrain_loader(cfg: Recipe, data_path: str | None = None, *, tokenizer: Any = None,
                          batch_size: int | None = None, seed: int | None = None, rank: int | None = None,
                          world_size: int | None = None, balance_micro_steps: int | None = None) -> PackedLoader:
    """The pretraining loader from a recipe: train.data_path, train.micro_batch_size, data.*, model geometry.

    Arguments left as None come from the recipe (seed: train.seed, else the recipe seed) and, for
    rank / world_size, from the running process group. ``balance_micro_steps`` (the run's gradient
    accumulation steps): balance each optimizer step's packs over ranks and micro-steps.
    """
    return PackedLoader(dataset_from_recipe(cfg, data_path, tokenizer), cfg, tokenizer=tokenizer,
                        batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                        balance_micro_steps=balance_micro_steps)
