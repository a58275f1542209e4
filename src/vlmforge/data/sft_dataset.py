"""SFT samples and batches from an SFT index (see :mod:`vlmforge.data.sft_index`).

:class:`SFTDataset` turns record ``i`` into ``{"input_ids", "labels", "pixel_values"}``: the chat
template is applied with the loss only on assistant turns (reply + end-of-turn token), each
``<image>`` becomes ``visual_tokens`` image-token ids with label -100, and the first token is -100
(nothing learns to predict across a sample boundary).

:class:`SFTLoader` makes training batches (the training-batch contract of the data layer):

- ``batching="pack"``: each epoch the records are shuffled (seed + epoch), taken in windows of
  ``pack_window`` records and packed with :func:`vlmforge.data.packing.plan_packs` on the index's
  ``mm_length`` (a pack never splits a conversation); a batch is ``batch_size`` packs (rows).
- ``batching="length_group"``: one conversation per row; rows are sorted by length inside
  mega-batches of ``batch_size * group_factor`` and batches are shuffled, so padding stays small.

The epoch plan is a pure function of (index, config, seed, epoch), so resume is exact:
``state_dict()`` is ``{"epoch", "batch", ...}`` and ``load_state_dict`` continues at the next batch
(``iter(loader)`` yields the rest of the current epoch, like the packed pretraining loader).
Ranks take global batches round-robin (``g % world_size == rank``; the epoch is cut to a multiple
of ``world_size`` batches so ranks never wait on each other); DataLoader workers take the rank's
batches round-robin too, and torch returns worker results in order, so the batch order does not
depend on ``num_workers``. A bad sample is skipped and counted by reason (``loader.skipped``);
in strict mode it raises.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from vlmforge.data.collate import collate_packs
from vlmforge.data.sft_index import SFTDataError, SFTIndex, open_index

IGNORE = -100


# ----------------------------------------------------------------------------- images


def _load_pixels(path: str, spec: dict):
    """Image file -> FloatTensor[3, size, size]; SFTDataError(reason missing_image | bad_image)."""
    from vlmforge.images import preprocess
    from vlmforge.shards import ImageDecodeError, decode_image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _sample_error("missing_image", f"image file not found: {path}") from None
    try:
        return preprocess(decode_image(data), spec)
    except ImageDecodeError as e:
        raise _sample_error("bad_image", f"image does not decode: {path}: {e}") from None


def _sample_error(reason: str, msg: str) -> SFTDataError:
    e = SFTDataError(msg)
    e.reason = reason  # type: ignore[attr-defined]
    return e


# ----------------------------------------------------------------------------- samples


class SFTDataset:
    """Map-style SFT samples over an index. ``dataset[i]`` raises :class:`SFTDataError` (with
    ``.reason``) on a bad sample; :class:`SFTLoader` skips and counts those."""

    def __init__(
        self,
        index: SFTIndex | str | os.PathLike,
        tokenizer,
        *,
        visual_tokens: int | None = None,
        image_spec: dict | None = None,
        image_root: str | os.PathLike | None = None,
        max_len: int | None = None,
    ):
        from vlmforge.text.tokenization import image_token_id

        self.index = index if isinstance(index, SFTIndex) else open_index(index)
        self.tok = tokenizer
        self.visual_tokens = int(visual_tokens or self.index.visual_tokens)
        self.image_spec = image_spec
        self.image_root = str(image_root) if image_root is not None else (self.index.image_root or "")
        self.max_len = max_len
        self.image_id = image_token_id(tokenizer)

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> np.ndarray:
        """Multimodal length of every record (from the index; exact if it was built exact)."""
        return self.index.mm_lengths(self.visual_tokens)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(input_ids with images expanded, labels, image paths) of record ``i``; no image I/O."""
        from vlmforge.text.tokenization import encode_conversation

        msgs, images = self.index.messages(i)
        ids, mask = encode_conversation(self.tok, msgs)
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.asarray(mask, dtype=bool)
        is_img = ids == self.image_id
        n_img = int(is_img.sum())
        if n_img != len(images):
            raise _sample_error(
                "image_token_mismatch",
                f"{self.index.where(i)}: {n_img} {self.tok.convert_ids_to_tokens(self.image_id)} token(s) for {len(images)} image(s)",
            )
        labels = np.where(mask & ~is_img, ids, IGNORE)
        if n_img and self.visual_tokens != 1:
            reps = np.where(is_img, self.visual_tokens, 1)
            ids, labels = np.repeat(ids, reps), np.repeat(labels, reps)
        if labels.size:
            labels[0] = IGNORE
        if self.max_len is not None and ids.size > self.max_len:
            raise _sample_error("too_long", f"{self.index.where(i)}: {ids.size} tokens > max_len {self.max_len}")
        return ids, labels, images

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, labels, images = self.tokens(i)
        pixel_values = None
        if images:
            if self.image_spec is None:
                raise ValueError("this SFT data has images: pass image_spec (vlmforge.arch.geometry.image_preprocess_spec)")
            import torch

            try:
                pixel_values = torch.stack(
                    [_load_pixels(os.path.join(self.image_root, p), self.image_spec) for p in images]
                )
            except SFTDataError as e:
                raise _sample_error(getattr(e, "reason", "bad_image"), f"{self.index.where(i)}: {e}") from None
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}


# ----------------------------------------------------------------------------- batching plan


def _cfg(cfg: Any, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default) if cfg is not None else default


def epoch_plan(lengths: np.ndarray, cfg: Any, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batches of one epoch as flat arrays: ``(records, row_starts, batch_starts)``.

    Row r holds ``records[row_starts[r]:row_starts[r+1]]``; batch b holds rows
    ``batch_starts[b]:batch_starts[b+1]``. Records longer than ``max_len`` are left out.
    A pure function of its inputs: the basis of exact resume.
    """
    from vlmforge.data.packing import plan_packs

    max_len = int(_cfg(cfg, "max_len", 4096))
    bs = int(_cfg(cfg, "batch_size", 8))
    mode = _cfg(cfg, "batching", "pack")
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    valid = np.flatnonzero((lengths >= 1) & (lengths <= max_len))
    order = rng.permutation(valid) if _cfg(cfg, "shuffle", True) else valid
    drop_last = bool(_cfg(cfg, "drop_last", True))
    if mode == "pack":
        # Flat arrays per window (never one Python object per record: 10M records must stay small).
        window = max(1, int(_cfg(cfg, "pack_window", 10000)))
        recs, sizes = [], []
        for a in range(0, order.size, window):
            ids = order[a : a + window]
            packs = plan_packs(lengths[ids], max_len, seed=int(rng.integers(2**31)))
            perm = rng.permutation(len(packs))  # mix long and short packs across batches
            recs.append(ids[np.concatenate([packs[j] for j in perm])])
            sizes.append(np.fromiter((packs[j].size for j in perm), np.int64, len(packs)))
        records = np.concatenate(recs) if recs else np.zeros(0, np.int64)
        sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
        row_starts = np.concatenate([[0], np.cumsum(sizes)])
        n_rows = sizes.size
        n_batches = n_rows // bs if drop_last else -(-n_rows // bs)
        batch_starts = np.minimum(np.arange(n_batches + 1) * bs, n_rows)
    elif mode == "length_group":
        # One record per row. Sort by length inside mega-batches, cut into batches of bs rows,
        # then shuffle the batches (vectorised: a batch id per record, stable sort by shuffled id).
        mega = bs * max(1, int(_cfg(cfg, "group_factor", 32)))
        n = order.size
        mega_id = np.arange(n) // mega
        grouped = order[np.lexsort((-lengths[order], mega_id))]  # by mega-batch, longest first
        pos_in_mega = np.arange(n) - mega_id * mega
        chunk_id = mega_id * (-(-mega // bs)) + pos_in_mega // bs
        _, chunk_id = np.unique(chunk_id, return_inverse=True)
        n_chunks = int(chunk_id.max()) + 1 if n else 0
        chunk_sizes = np.bincount(chunk_id, minlength=n_chunks)
        keep = chunk_sizes == bs if drop_last else np.ones(n_chunks, bool)
        rank = rng.permutation(n_chunks)
        sel = keep[chunk_id]
        records = grouped[sel][np.argsort(rank[chunk_id[sel]], kind="stable")]
        kept_sizes = chunk_sizes[keep][np.argsort(rank[keep])]
        row_starts = np.arange(records.size + 1)
        batch_starts = np.concatenate([[0], np.cumsum(kept_sizes)])
    else:
        raise ValueError(f"sft batching must be 'pack' or 'length_group', got {mode!r}")
    return records, row_starts, batch_starts


# ----------------------------------------------------------------------------- loader


class _Worker:
    """Builds the rank's batches j = start + k*stride + offset from the epoch plan (runs in workers)."""

    def __init__(self, loader: "SFTLoader", plan, start: int, n_local: int):
        self.loader, self.plan, self.start, self.n_local = loader, plan, start, n_local

    def __iter__(self):
        try:
            import torch.utils.data as tud

            info = tud.get_worker_info()
        except ImportError:  # pragma: no cover
            info = None
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(self.start + wid, self.n_local, nw):
            yield self.loader.build_batch(self.plan, j)


def _iterable(worker: _Worker):
    import torch.utils.data as tud

    class _It(tud.IterableDataset):
        def __iter__(self):
            return iter(worker)

    return _It()


class SFTLoader:
    """Deterministic, resumable SFT batches for one rank (each item a training-batch dict).

    Same protocol as the packed pretraining loader: ``iter(loader)`` yields the rest of the
    current epoch, after which the next epoch is current; ``set_epoch(e)`` starts epoch ``e``;
    ``state_dict()`` / ``load_state_dict()`` resume at the exact next batch. ``forever()`` runs
    epoch after epoch."""

    def __init__(
        self,
        dataset: SFTDataset,
        cfg: Any,
        *,
        pad_id: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.ds = dataset
        self.cfg = cfg
        self.pad_id = int(pad_id if pad_id is not None else dataset.tok.pad_token_id)
        self.seed = int(seed)
        if rank is None or world_size is None:
            from vlmforge import dist

            rank, world_size = dist.rank(), dist.world_size()
        self.rank, self.world = int(rank), int(world_size)
        self.strict = bool(_cfg(cfg, "strict", False))
        self.max_len = int(_cfg(cfg, "max_len", 4096))
        self.num_workers = int(_cfg(cfg, "num_workers", 0))
        self.epoch, self.batch = 0, 0
        self.skipped: dict[str, int] = {}
        self._lengths = dataset.lengths()
        too_long = int((np.asarray(self._lengths) > self.max_len).sum())
        if too_long:
            self.skipped["too_long"] = too_long
        self._plan_key: tuple | None = None
        self._plan = None

    # -- plan ---------------------------------------------------------------------------
    def plan(self, epoch: int):
        if self._plan_key != (epoch,):
            self._plan = epoch_plan(self._lengths, self.cfg, self.seed, epoch)
            self._plan_key = (epoch,)
        return self._plan

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return (len(self.plan(epoch)[2]) - 1) // self.world

    # -- state --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (no-op if it is already the current epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "records": len(self.ds), "world_size": self.world,
                "batch_size": int(_cfg(self.cfg, "batch_size", 8)), "batching": str(_cfg(self.cfg, "batching", "pack"))}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "skipped": dict(self.skipped), **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in self._fingerprint().items():
            if key in state and state[key] != mine:
                raise SFTDataError(f"SFT loader state has {key}={state[key]!r} but this run has {mine!r}: cannot resume exactly")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped = dict(state.get("skipped", {}))

    # -- building -----------------------------------------------------------------------
    def _sample(self, i: int, skipped: dict) -> dict | None:
        try:
            return self.ds[int(i)]
        except SFTDataError as e:
            if self.strict:
                raise
            reason = getattr(e, "reason", "bad_record")
            skipped[reason] = skipped.get(reason, 0) + 1
            return None

    def build_batch(self, plan, j: int) -> dict:
        """Rank-local batch ``j`` of the plan (global batch ``j * world + rank``)."""
        records, row_starts, batch_starts = plan
        g = j * self.world + self.rank
        skipped: dict[str, int] = {}
        rows: list[list[dict]] = []
        for r in range(int(batch_starts[g]), int(batch_starts[g + 1])):
            row, used = [], 0
            for i in records[row_starts[r] : row_starts[r + 1]]:
                s = self._sample(i, skipped)
                if s is None:
                    continue
                n = int(s["input_ids"].size)
                if used + n > self.max_len and row:  # estimated lengths: move it to an extra row
                    rows.append(row)
                    row, used = [], 0
                    skipped["overflow_rows"] = skipped.get("overflow_rows", 0) + 1
                row.append(s)
                used += n
            if row:
                rows.append(row)
        batch = collate_packs(rows, self.pad_id) if rows else None
        return {"batch": batch, "skipped": skipped, "j": j}

    # -- iteration ----------------------------------------------------------------------
    def _epoch_items(self, plan, start: int, n_local: int) -> Iterator[dict]:
        worker = _Worker(self, plan, start, n_local)
        if self.num_workers <= 0:
            yield from worker
            return
        import torch.utils.data as tud

        dl = tud.DataLoader(
            _iterable(worker),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=lambda x: x,
            persistent_workers=False,
        )
        yield from dl

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the next epoch is current."""
        plan = self.plan(self.epoch)
        n_local = (len(plan[2]) - 1) // self.world
        if n_local == 0:
            raise SFTDataError(
                f"SFT data gives no batch per rank (records {len(self.ds)}, batch_size "
                f"{_cfg(self.cfg, 'batch_size', 8)}, world size {self.world}, max_len {self.max_len})"
            )
        for item in self._epoch_items(plan, self.batch, n_local):
            for k, v in item["skipped"].items():
                self.skipped[k] = self.skipped.get(k, 0) + v
            self.batch = item["j"] + 1
            if item["batch"] is not None:
                yield item["batch"]
        self.epoch, self.batch = self.epoch + 1, 0

    def forever(self) -> Iterator[dict]:
        while True:
            yield from self


def build_sft_loader(
    recipe,
    tokenizer,
    *,
    sft_cfg: Any = None,
    seed: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> SFTLoader:
    """The SFT loader a training run uses: index ``sft.index``, images preprocessed for
    ``recipe.model`` (its visual tokens per image and image spec), batching per ``sft``."""
    from vlmforge.arch.geometry import image_preprocess_spec, visual_tokens_per_image

    sft = sft_cfg if sft_cfg is not None else recipe.sft
    if not sft.index:
        raise SFTDataError("sft.index is not set: build one with `vlmforge sft-index` and set sft.index=DIR")
    ds = SFTDataset(
        sft.index,
        tokenizer,
        visual_tokens=visual_tokens_per_image(recipe.model),
        image_spec=image_preprocess_spec(recipe.model),
        image_root=sft.image_root,
        max_len=sft.max_len,
    )
    return SFTLoader(
        ds, sft, seed=recipe.seed if seed is None else seed, rank=rank, world_size=world_size
    )
