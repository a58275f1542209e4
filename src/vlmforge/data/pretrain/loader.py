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
from vlmforge.arch.geometry import image_preprocess_spec, visual_tokens_per_image
from vlmforge.arch.tokens import IM_END, IMAGE_TOKEN
from vlmforge.config.recipe import Recipe, run_seed
from vlmforge.data.collate import IGNORE_INDEX, collate_packs
from vlmforge.data.pretrain.packed_shards import PackedShardReader, list_packed_shards
from vlmforge.errors import ConfigError, UserError
from vlmforge.imagedecode import ImageDecodeError, decode_image
from vlmforge.images import preprocess_batch

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
) -> dict[str, Any]:
    """``<image> x N + caption + <|im_end|>``; labels ignore the visual tokens (and the separator if unsupervised)."""
    cap = np.asarray(caption_ids, dtype=np.int64)
    ids = np.concatenate(
        [np.full(num_visual_tokens, image_token_id, np.int64), cap, np.array([sep_id], np.int64)]
    )
    labels = ids.copy()
    labels[:num_visual_tokens] = IGNORE_INDEX
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
    ):
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
        self.image_token_id, self.sep_id, self.pad_id = int(geo["image_token_id"]), int(geo["sep_id"]), int(geo["pad_id"])
        self.image_spec = dict(image_spec or geo["image_preprocess"])
        self.supervise_sep = supervise_sep
        self.strict = strict
        self.readers = [PackedShardReader(p) for p in list_packed_shards(self.folder)]
        self.offsets = np.cumsum([0] + [len(r) for r in self.readers])
        self.skipped = 0  # images that failed to decode (this process only)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def pack_length(self, i: int) -> int:
        r, j = self._locate(i)
        return int(self.readers[r].lengths[j])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"pack {i} out of range ({len(self)} packs)")
        r = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return r, i - int(self.offsets[r])

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        r, j = self._locate(int(i))
        meta, tokens, images = self.readers[r].read_pack(j)
        kept, decoded, at, img = [], [], 0, 0
        for s in meta["samples"]:
            ids = tokens[at : at + s["n_text"]]
            at += s["n_text"]
            if s["kind"] == "text":
                kept.append((s, ids))
                continue
            data = images[img]
            img += 1
            try:
                decoded.append(decode_image(data))
            except ImageDecodeError as e:
                where = f"{self.readers[r].tar_path} pack {j} sample {s['key']!r}"
                if self.strict:
                    raise PackedDataError(f"{where}: {e}") from e
                self.skipped += 1
                log.warning("skipping %s: %s", where, e)
                continue
            kept.append((s, ids))
        # All images of the pack go into one buffer; samples hold consecutive views of it, so
        # collating a one-pack batch needs no copy.
        pixels = preprocess_batch(decoded, self.image_spec) if decoded else torch.zeros(0)
        samples, k = [], 0
        for s, ids in kept:
            if s["kind"] == "text":
                samples.append(text_sample(ids, sep_id=self.sep_id, supervise_sep=self.supervise_sep,
                                           add_sep=bool(s["sep"])))
            else:
                samples.append(caption_sample(ids, image_token_id=self.image_token_id,
                                              num_visual_tokens=self.visual_tokens, sep_id=self.sep_id,
                                              supervise_sep=self.supervise_sep, pixel_values=pixels[k : k + 1]))
                k += 1
        if not samples:  # every image of the pack failed: keep the row valid with a lone separator
            samples.append(text_sample([], sep_id=self.sep_id))
        return samples


class _Collate:
    """Picklable collate_fn (DataLoader workers under spawn)."""

    def __init__(self, pad_id: int, pad_to: int | None, positions: str):
        self.pad_id, self.pad_to, self.positions = pad_id, pad_to, positions

    def __call__(self, packs):
        return collate_packs(packs, self.pad_id, pad_to=self.pad_to, positions=self.positions)


class PackedLoader:
    """Batches of ``batch_size`` packs for this rank; see the module docstring for the split and resume.

    ``dataset`` is a :class:`PackedDataset`, or a packed folder together with a recipe ``cfg``
    (the dataset is then built against the recipe's model geometry, and unset options come from
    ``cfg.data`` / ``cfg.train.micro_batch_size`` / the recipe seed). A ``tokenizer``, if given,
    is checked against the token ids the folder was packed with.
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
    ):
        if not isinstance(dataset, PackedDataset):
            if cfg is None:
                raise ValueError("PackedLoader(path) needs the recipe: PackedLoader(path, cfg, ...)")
            dataset = dataset_from_recipe(cfg, str(dataset))
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
        if len(dataset) == 0:
            raise PackedDataError(f"{dataset.folder} holds no packs")
        self.dataset = dataset
        self.batch_size, self.seed = batch_size, int(seed or 0)
        self.shuffle = True if shuffle is None else bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.remainder = int(num_workers or 0), remainder
        self.collate = _Collate(dataset.pad_id, pad_to, positions or "restart")
        self.epoch, self.batch = 0, 0  # batch = batches of this epoch already handed out

    # -- plan ---------------------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        n, g = len(self.dataset), self.batch_size * self.world_size
        if self.remainder == "drop" and n >= g:
            return n // g
        return math.ceil(n / g)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """[batches, batch_size] pack indices this rank reads in ``epoch``."""
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        nb = self.batches_per_epoch()
        order = np.resize(order, nb * self.batch_size * self.world_size)  # wrap: repeats from the start
        return order.reshape(nb, self.world_size, self.batch_size)[:, self.rank, :]

    # -- iterate ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (no-op if it is already the current epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch (empty if it is used up); afterwards the next epoch is current."""
        plan = self.epoch_plan(self.epoch)[self.batch :]
        dl = tud.DataLoader(
            self.dataset,
            batch_sampler=[[int(i) for i in b] for b in plan],
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        for batch in dl:
            self.batch += 1
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0

    # -- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "num_packs": len(self.dataset),
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_packs", len(self.dataset)), ("world_size", self.world_size),
                          ("batch_size", self.batch_size), ("seed", self.seed)):
            if key in state and int(state[key]) != mine:
                raise PackedDataError(f"loader state has {key}={state[key]} but this run has {mine}: cannot resume exactly")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def _check_tokenizer(tok, ds: PackedDataset) -> None:
    for _name, token, packed in (("image", IMAGE_TOKEN, ds.image_token_id), ("separator", IM_END, ds.sep_id)):
        tid = tok.convert_tokens_to_ids(token)
        if tid != packed:
            raise PackedDataError(
                f"{ds.folder} was packed with {token} = id {packed} but this tokenizer has {tid}: "
                f"re-pack with the model's tokenizer"
            )


def dataset_from_recipe(cfg: Recipe, data_path: str | None = None) -> PackedDataset:
    """The packed dataset of ``data_path`` (default train.data_path), checked against the recipe's model."""
    path = data_path or cfg.train.data_path
    if not path:
        raise ConfigError("train.data_path: no packed data folder given (run `vlmforge pack` first)")
    d = cfg.data
    return PackedDataset(path, visual_tokens=visual_tokens_per_image(cfg.model),
                         image_spec=image_preprocess_spec(cfg.model), supervise_sep=d.supervise_sep, strict=d.strict)


def build_pretrain_loader(cfg: Recipe, data_path: str | None = None, *, tokenizer: Any = None,
                          batch_size: int | None = None, seed: int | None = None, rank: int | None = None,
                          world_size: int | None = None) -> PackedLoader:
    """The pretraining loader from a recipe: train.data_path, train.micro_batch_size, data.*, model geometry.

    Arguments left as None come from the recipe (seed: train.seed, else the recipe seed) and, for
    rank / world_size, from the running process group.
    """
    return PackedLoader(dataset_from_recipe(cfg, data_path), cfg, tokenizer=tokenizer, batch_size=batch_size,
                        seed=seed, rank=rank, world_size=world_size)
