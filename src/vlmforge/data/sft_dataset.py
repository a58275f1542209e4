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
``state_dict()`` is ``{"epoch", "batch"}`` and ``load_state_dict`` continues at the next batch.
Ranks take global batches round-robin (``g % world_size == rank``; the epoch is cut to a multiple
of ``world_size`` batches so ranks never wait on each other); DataLoader workers take the rank's
batches round-robin too, and torch returns worker results in order, so the batch order does not
depend on ``num_workers``. A bad sample is skipped and counted by reason (``loader.skipped``);
in strict mode it raises.
"""

from __future__ import annotations

import io
import os
from typing import Any, Iterator

import numpy as np

from vlmforge.data.sft_index import SFTDataError, SFTIndex, open_index

IGNORE = -100


# ----------------------------------------------------------------------------- images


def _preprocess_image(img, spec: dict):
    """PIL image -> FloatTensor[3, size, size] (resize, rescale, normalise), via the shared helper if present."""
    try:
        from vlmforge.data.images import preprocess
    except ImportError:  # pragma: no cover - the shared helper is the normal path
        preprocess = None
    if preprocess is not None:
        return preprocess(img, spec)
    import torch
    from PIL import Image

    size = int(spec["size"])
    img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) * float(spec.get("rescale", 1 / 255))
    arr = (arr - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _load_image(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _sample_error("missing_image", f"image file not found: {path}") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as e:
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
        from vlmforge.data.tokenizer import image_token_id

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
        from vlmforge.data.tokenizer import encode_conversation

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
                raise ValueError("this SFT data has images: pass image_spec (vlmforge.model.geometry.image_preprocess_spec)")
            import torch

            try:
                pixel_values = torch.stack(
                    [_preprocess_image(_load_image(os.path.join(self.image_root, p)), self.image_spec) for p in images]
                )
            except SFTDataError as e:
                raise _sample_error(getattr(e, "reason", "bad_image"), f"{self.index.where(i)}: {e}") from None
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}


# ----------------------------------------------------------------------------- collation


def collate_rows(rows: list[list[dict]], pad_id: int) -> dict:
    """Rows of samples -> the training batch dict (padding to the longest row).

    ``position_ids`` restart at 0 for each sample, ``seq_ids`` number the samples of a row
    (-1 on padding), labels are -100 on padding, ``pixel_values`` holds the images in order of
    appearance (row-major), or is None when the batch has none.
    """
    import torch

    L = max(sum(int(s["input_ids"].size) for s in row) for row in rows)
    B = len(rows)
    input_ids = np.full((B, L), pad_id, np.int64)
    labels = np.full((B, L), IGNORE, np.int64)
    position_ids = np.zeros((B, L), np.int64)
    seq_ids = np.full((B, L), -1, np.int64)
    pix = []
    for b, row in enumerate(rows):
        p = 0
        for k, s in enumerate(row):
            n = int(s["input_ids"].size)
            input_ids[b, p : p + n] = s["input_ids"]
            labels[b, p : p + n] = s["labels"]
            labels[b, p] = IGNORE  # every packed sample's first token
            position_ids[b, p : p + n] = np.arange(n)
            seq_ids[b, p : p + n] = k
            if s.get("pixel_values") is not None:
                pix.append(s["pixel_values"])
            p += n
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "seq_ids": torch.from_numpy(seq_ids),
        "pixel_values": torch.cat(pix) if pix else None,
    }


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
    rows: list[np.ndarray] = []
    if mode == "pack":
        window = max(1, int(_cfg(cfg, "pack_window", 10000)))
        for w, a in enumerate(range(0, order.size, window)):
            ids = order[a : a + window]
            packs = plan_packs(lengths[ids], max_len, seed=int(rng.integers(2**31)))
            perm = rng.permutation(len(packs))  # mix long and short packs across batches
            rows.extend(ids[packs[j]] for j in perm)
    elif mode == "length_group":
        mega = bs * max(1, int(_cfg(cfg, "group_factor", 32)))
        chunks = []
        for a in range(0, order.size, mega):
            ids = order[a : a + mega]
            ids = ids[np.argsort(-lengths[ids], kind="stable")]
            chunks.extend(ids[k : k + bs] for k in range(0, ids.size, bs))
        for j in rng.permutation(len(chunks)) if chunks else []:
            rows.extend(chunks[j][:, None])
    else:
        raise ValueError(f"sft batching must be 'pack' or 'length_group', got {mode!r}")
    sizes = np.fromiter((r.size for r in rows), np.int64, len(rows))
    records = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    row_starts = np.concatenate([[0], np.cumsum(sizes)])
    n_batches = len(rows) // bs if _cfg(cfg, "drop_last", True) else -(-len(rows) // bs)
    batch_starts = np.minimum(np.arange(n_batches + 1) * bs, len(rows))
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
    """Deterministic, resumable SFT batches for one rank. Iterating goes on over epochs
    (``max_epochs`` to stop); each item is a training-batch dict."""

    def __init__(
        self,
        dataset: SFTDataset,
        cfg: Any,
        *,
        pad_id: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_epochs: int | None = None,
    ):
        self.ds = dataset
        self.cfg = cfg
        self.pad_id = int(pad_id if pad_id is not None else dataset.tok.pad_token_id)
        self.seed = int(seed)
        if rank is None or world_size is None:
            from vlmforge import dist

            rank, world_size = dist.rank(), dist.world_size()
        self.rank, self.world = int(rank), int(world_size)
        self.max_epochs = max_epochs
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
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
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
        batch = collate_rows(rows, self.pad_id) if rows else None
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
        while self.max_epochs is None or self.epoch < self.max_epochs:
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
