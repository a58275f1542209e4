"""SFT training batches from an SFT index: :class:`SFTLoader` and :func:`build_sft_loader`.

- ``batching="pack"``: each epoch the records are shuffled (seed + epoch), taken in windows of
  ``pack_window`` records and packed with :func:`vlmforge.data.packer.plan_packs` on the index's
  ``mm_length`` (a pack never splits a conversation); a batch is ``batch_size`` packs (rows).
- ``batching="length_group"``: one conversation per row; rows are sorted by length inside
  mega-batches of ``batch_size * group_factor`` and batches are shuffled, so padding stays small.

The epoch plan is a pure function of (index, config, batch size, seed, epoch), so resume is exact:
``state_dict()`` is ``{"epoch", "batch", ...}`` and ``load_state_dict`` continues at the next batch
(``iter(loader)`` yields the rest of the current epoch, like the packed pretraining loader).
Ranks take global batches round-robin (``g % world_size == rank``; the epoch is cut to a multiple
of ``world_size`` batches so ranks never wait on each other). With ``balance_micro_steps`` (rank
balancing, for dynamic tiles) the plan's rows are instead cut into optimizer steps of
``world_size x micro_steps x batch_size`` rows, and each step's rows are dealt to (rank,
micro-step, slot) by :class:`vlmforge.data.balance.StepPlanner` on each row's vision tokens (its
records' ``visual_tokens``) and LLM tokens (their ``mm_length``); rank r yields its slots in
micro-step order, and the epoch's last incomplete step is left out. A step is planned when its
first batch is asked for, never the whole epoch up front. A step's rows do not depend on the
number of ranks, and its plan is a pure function of the step, so resume stays exact.
The main process picks each batch's rows (so a step is planned once, not once per worker) and
hands them to the DataLoader workers, which build the batches; torch returns them in order, so the
batch order does not depend on ``num_workers``. A bad sample (:mod:`.samples`) is skipped and counted by reason
(``loader.skipped``); in strict mode it raises.

Sources that ask for it (:meth:`SFTDataset.augments`) get random JPEG quality on their images,
drawn from (seed, epoch, record), so the batches stay a pure function of the plan (:mod:`.augment`).

A batch's images are preprocessed into one buffer that the collated batch uses as it is. Workers
send them resized as uint8 and the main process normalises them, for the reason and with the
arithmetic of the packed loader (:func:`vlmforge.data.pixels.receive_from_worker`).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch.utils.data as tud

from vlmforge import dist
from vlmforge.arch.geometry import image_layout, image_preprocess_spec
from vlmforge.config.recipe import Recipe
from vlmforge.config.sft import SFTDataConfig
from vlmforge.data.balance import StepPlanner
from vlmforge.data.collate import collate_packs
from vlmforge.data.packer import plan_packs
from vlmforge.data.pixels import PREFETCH, PixelSlots, pixels_of, receive_from_worker, send_from_worker
from vlmforge.data.sft.records import SFTDataError
from vlmforge.data.sft.samples import SFTDataset


def epoch_plan(
    lengths: np.ndarray, cfg: SFTDataConfig, seed: int, epoch: int, *, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batches of one epoch as flat arrays: ``(records, row_starts, batch_starts)``.

    Row r holds ``records[row_starts[r]:row_starts[r+1]]``; batch b holds rows
    ``batch_starts[b]:batch_starts[b+1]`` (``batch_size`` rows). Records longer than
    ``cfg.max_len`` are left out. A pure function of its inputs: the basis of exact resume.
    """
    max_len = int(cfg.max_len)
    bs = int(batch_size)
    mode = cfg.batching
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    valid = np.flatnonzero((lengths >= 1) & (lengths <= max_len))
    order = rng.permutation(valid) if cfg.shuffle else valid
    drop_last = bool(cfg.drop_last)
    if mode == "pack":
        # Flat arrays per window (never one Python object per record: millions of records must stay small).
        window = max(1, int(cfg.pack_window))
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
        mega = bs * max(1, int(cfg.group_factor))
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


class _Batches(tud.Dataset):
    """Key ``(j, rows)`` -> the rank's batch ``j`` of the epoch plan, made of those plan rows (in
    DataLoader workers, or in this process)."""

    def __init__(self, loader: SFTLoader, plan, slots: PixelSlots | None = None, epoch: int = 0):
        self.loader, self.plan = loader, plan[:3]  # the rows are chosen by the main process
        self.slots = slots  # set in workers: uint8 pixels through reused shared buffers
        self.epoch = epoch

    def __getitem__(self, key: tuple[int, list[int]]) -> dict:
        j, rows = key
        item = self.loader.build_batch(self.plan, j, as_uint8=self.slots is not None, epoch=self.epoch, rows=rows,
                                       slots=self.slots)
        if self.slots is not None and item["batch"] is not None:
            item["batch"] = send_from_worker(item["batch"], self.slots)
        return item


class _Keys:
    """The DataLoader's sampler: ``(j, rows of batch j)`` for j in ``start..n_local``, picked as it asks."""

    def __init__(self, loader: SFTLoader, plan, start: int, n_local: int):
        self.loader, self.plan, self.start, self.n_local = loader, plan, start, n_local

    def __len__(self) -> int:
        return max(0, self.n_local - self.start)

    def __iter__(self):
        for j in range(self.start, self.n_local):
            yield j, self.loader.batch_rows(self.plan, j)


def _as_is(item):
    return item


class SFTLoader:
    """Deterministic, resumable SFT batches for one rank (each item a training-batch dict).

    Same protocol as the packed pretraining loader: ``iter(loader)`` yields the rest of the
    current epoch, after which the next epoch is current; ``set_epoch(e)`` starts epoch ``e``;
    ``state_dict()`` / ``load_state_dict()`` resume at the exact next batch. ``forever()`` runs
    epoch after epoch. ``batch_size``: rows per batch on this rank (the trainer's
    ``train.micro_batch_size``)."""

    def __init__(
        self,
        dataset: SFTDataset,
        cfg: SFTDataConfig,
        *,
        batch_size: int,
        pad_id: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        balance_micro_steps: int | None = None,
    ):
        self.ds = dataset
        self.cfg = cfg
        self.pad_id = int(pad_id if pad_id is not None else dataset.tok.pad_token_id)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rank is None or world_size is None:
            rank, world_size = dist.rank(), dist.world_size()
        self.rank, self.world = int(rank), int(world_size)
        # micro-steps per optimizer step when ranks are balanced; None: the round-robin split
        self.balance = int(balance_micro_steps) if balance_micro_steps is not None else None
        if self.balance is not None and self.balance < 1:
            raise ValueError(f"balance_micro_steps must be >= 1, got {balance_micro_steps}")
        self.strict = bool(cfg.strict)
        self.max_len = int(cfg.max_len)
        self.num_workers = int(cfg.num_workers)
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
        """The epoch's plan ``(records, row_starts, batch_starts)`` (:func:`epoch_plan`); with
        balancing a fourth item is the :class:`StepPlanner` of its rows (steps planned as read)."""
        if self._plan_key != (epoch,):
            self._plan = epoch_plan(self._lengths, self.cfg, self.seed, epoch, batch_size=self.batch_size)
            if self.balance is not None:
                self._plan = (*self._plan, self._step_planner(self._plan))
            self._plan_key = (epoch,)
        return self._plan

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimizer step over all ranks (balancing on)."""
        return self.world * int(self.balance or 1) * self.batch_size

    def _step_planner(self, plan) -> StepPlanner:
        """The balanced steps of the plan's rows (whole steps of them, in plan order), on each row's
        vision and LLM tokens (sums over its records)."""
        records, row_starts, batch_starts = plan[:3]

        def per_row(values) -> np.ndarray:
            c = np.concatenate([[0], np.cumsum(np.asarray(values, np.int64)[records])])
            return c[row_starts[1:]] - c[row_starts[:-1]]

        g = self.rows_per_step
        order = np.arange(int(batch_starts[-1]) // g * g)
        return StepPlanner(per_row(self.ds.visual_lengths()), per_row(self._lengths), order, self.world,
                           self.balance, self.batch_size)

    def batch_rows(self, plan, j: int) -> list[int]:
        """The plan rows of rank-local batch ``j``: global batch ``j * world + rank``, or balanced, the
        slots of this rank in micro-step ``j % micro_steps`` of step ``j // micro_steps``."""
        if self.balance is not None:
            return plan[3].rank_batch(self.rank, j).tolist()
        batch_starts = plan[2]
        g = j * self.world + self.rank
        return list(range(int(batch_starts[g]), int(batch_starts[g + 1])))

    def batches_per_epoch(self, epoch: int = 0) -> int:
        plan = self.plan(epoch)
        if self.balance is not None:  # whole steps of the rows in the plan's batches
            return int(plan[2][-1]) // self.rows_per_step * self.balance
        return (len(plan[2]) - 1) // self.world

    # -- state --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (no-op if it is already the current epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "records": len(self.ds), "world_size": self.world,
                "batch_size": self.batch_size, "batching": str(self.cfg.batching),
                "balance_micro_steps": self.balance}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "skipped": dict(self.skipped), **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in self._fingerprint().items():
            if key in state and state[key] != mine:
                raise SFTDataError(f"SFT loader state has {key}={state[key]!r} but this run has {mine!r}: cannot resume exactly")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped = dict(state.get("skipped", {}))

    # -- building -----------------------------------------------------------------------
    def _sample(self, i: int, skipped: dict, epoch: int) -> dict | None:
        """Record ``i`` as a sample whose ``images`` are decoded (and JPEG-augmented if its source
        asks), not yet preprocessed."""
        try:
            ids, labels, images = self.ds.decoded(int(i), augment=(self.seed, epoch))
        except SFTDataError as e:
            if self.strict:
                raise
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            return None
        return {"input_ids": ids, "labels": labels, "images": images}

    def build_batch(self, plan, j: int, as_uint8: bool = False, epoch: int | None = None,
                    rows: list[int] | None = None, slots: PixelSlots | None = None) -> dict:
        """Rank-local batch ``j`` of the plan (its plan ``rows``, default :meth:`batch_rows`);
        ``as_uint8``: its pixel values resized but not normalised (``receive_from_worker`` finishes
        them), in a free buffer of the worker's ``slots`` if there is one. ``epoch``: the plan's
        epoch (default the current one), which the JPEG qualities depend on."""
        records, row_starts = plan[:2]
        epoch = self.epoch if epoch is None else int(epoch)
        plan_rows = self.batch_rows(plan, j) if rows is None else rows
        skipped: dict[str, int] = {}
        rows: list[list[dict]] = []
        for r in plan_rows:
            row, used = [], 0
            for i in records[row_starts[r] : row_starts[r + 1]]:
                s = self._sample(i, skipped, epoch)
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
        # every image of the batch into one buffer, in the collator's order; samples hold views of it
        images = [im for row in rows for s in row for im in s["images"]]
        pixels = pixels_of(images, self.ds.image_spec, as_uint8, slots) if images else None
        at = 0
        for row in rows:
            for s in row:
                n = len(s.pop("images"))
                s["pixel_values"] = pixels[at : at + n] if n else None
                at += n
        batch = collate_packs(rows, self.pad_id) if rows else None
        return {"batch": batch, "skipped": skipped, "j": j}

    # -- iteration ----------------------------------------------------------------------
    def _epoch_items(self, plan, start: int, n_local: int) -> Iterator[dict]:
        keys = _Keys(self, plan, start, n_local)
        if self.num_workers <= 0:
            batches = _Batches(self, plan, epoch=self.epoch)
            yield from (batches[key] for key in keys)
            return
        slots = PixelSlots(self.num_workers, PREFETCH + 2)
        dl = tud.DataLoader(
            _Batches(self, plan, slots, epoch=self.epoch),
            sampler=keys,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            prefetch_factor=PREFETCH,
            persistent_workers=False,
        )
        for item in dl:
            if item["batch"] is not None:
                item["batch"] = receive_from_worker(item["batch"], self.ds.image_spec, slots)
            yield item

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the next epoch is current."""
        plan = self.plan(self.epoch)
        n_local = self.batches_per_epoch(self.epoch)
        if n_local == 0:
            raise SFTDataError(
                f"SFT data gives no batch per rank (records {len(self.ds)}, batch_size "
                f"{self.batch_size}, world size {self.world}, max_len {self.max_len})"
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
    recipe: Recipe,
    tokenizer,
    *,
    batch_size: int,
    sft_cfg: SFTDataConfig | None = None,
    seed: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    verdicts: tuple[int, int] | None = None,
    balance_micro_steps: int | None = None,
) -> SFTLoader:
    """The SFT loader a training run uses: index ``sft.index``, images preprocessed for
    ``recipe.model`` (its image layout: tokens per tile, tiles, wrap; and image spec), batching per
    ``sft`` (``sft_cfg``, default ``recipe.sft``), ``batch_size`` rows per batch on this rank.
    An index built for another dynamic layout is refused (rebuild it with this recipe).
    ``balance_micro_steps`` (the trainer's gradient-accumulation steps): rank balancing of each
    optimizer step's rows (see the module docstring); None: the round-robin split.
    ``verdicts`` (ids of '+' and '-', stage prm): only each assistant turn's verdict is supervised.
    Random JPEG quality: on the index's meta-file sources that set ``data_augment``, and on its plain
    record files when ``sft.jpeg_augment`` is true."""
    sft = sft_cfg if sft_cfg is not None else recipe.sft
    if not sft.index:
        raise SFTDataError("sft.index is not set: build one with `vlmforge sft-index` and set sft.index=DIR")
    ds = SFTDataset(
        sft.index,
        tokenizer,
        layout=image_layout(recipe.model, tokenizer),
        image_spec=image_preprocess_spec(recipe.model),
        image_root=sft.image_root,
        max_len=sft.max_len,
        allow_absolute_paths=sft.allow_absolute_paths,
        verdicts=verdicts,
        jpeg_augment=bool(sft.jpeg_augment),
    )
    return SFTLoader(
        ds, sft, batch_size=batch_size, seed=recipe.seed if seed is None else seed, rank=rank, world_size=world_size,
        balance_micro_steps=balance_micro_steps,
    )
