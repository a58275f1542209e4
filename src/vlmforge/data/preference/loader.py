"""MPO training batches from a preference index: :class:`PreferenceLoader` and :func:`build_preference_loader`.

A micro-batch is ``batch_size`` pairs in the shared-prompt or duplicated layout (:mod:`.layouts`).
Each epoch the valid pairs (prompt + longer response <= ``preference.max_len``) are shuffled from
(seed, epoch) and cut into micro-batches; ranks take them round-robin (``g % world_size == rank``,
the epoch cut to a multiple of ``world_size`` micro-batches so ranks never wait on each other), and
DataLoader workers take the rank's micro-batches round-robin too (torch returns them in order, so
the batches do not depend on ``preference.num_workers``). The plan is a pure function of (index,
config, batch size, seed, epoch): ``state_dict()`` is ``{"epoch", "batch", ...}`` and resume is
exact, as with the SFT loader. A pair whose image vanished or no longer decodes is skipped and
counted by reason (``loader.skipped``; ``preference.strict``: raised).

:meth:`PreferenceLoader.reference_batches` gives every valid pair once, in index order, for
precomputing the reference model's log-probs: valid pair ``k`` (the k-th valid record) is on rank
``k % world_size``, so the ranks' shares differ by at most one pair.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
import torch.utils.data as tud

from vlmforge.config.preference import PreferenceDataConfig
from vlmforge.config.recipe import Recipe
from vlmforge.data.preference.formats import PreferenceDataError
from vlmforge.data.preference.index import PreferenceIndex, open_preference_index
from vlmforge.data.preference.layouts import LAYOUTS, PairSample, build_batch
from vlmforge.data.preference.tokens import end_of_turn_id, prompt_ids, response_ids
from vlmforge.data.sft.records import SFTDataError
from vlmforge.data.sft.samples import load_pixels
from vlmforge.errors import ConfigError
from vlmforge.files import PathOutsideRootError, resolve_inside
from vlmforge.text.tokenization import image_token_id, tokenizer_fingerprint


class PreferenceSamples:
    """Record ``i`` of a preference index -> :class:`PairSample` (token ids, pixel values).
    Raises :class:`PreferenceDataError` (with ``.reason``) for a pair that cannot be loaded."""

    def __init__(self, index: PreferenceIndex, tokenizer, *, visual_tokens: int, image_spec: dict | None,
                 allow_absolute_paths: bool = False):
        self.index = index
        self.tok = tokenizer
        self.visual_tokens = int(visual_tokens)
        self.image_spec = image_spec
        self.allow_absolute_paths = bool(allow_absolute_paths or index.allow_absolute_paths)
        self.image_id = image_token_id(tokenizer)
        self.end_id = end_of_turn_id(tokenizer)
        self._dirs: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.index)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(prompt ids with images expanded, chosen ids, rejected ids, image paths as written); no image I/O."""
        pair = self.index.pair(i)
        ids = np.asarray(prompt_ids(self.tok, pair.question), np.int64)
        is_img = ids == self.image_id
        if int(is_img.sum()) != len(pair.images):
            raise PreferenceDataError(
                f"{self.index.where(i)}: {int(is_img.sum())} image token(s) in the prompt for {len(pair.images)} image(s)",
                "image_marker_mismatch",
            )
        if pair.images and self.visual_tokens != 1:
            ids = np.repeat(ids, np.where(is_img, self.visual_tokens, 1))
        chosen = np.asarray(response_ids(self.tok, pair.chosen, self.end_id), np.int64)
        rejected = np.asarray(response_ids(self.tok, pair.rejected, self.end_id), np.int64)
        return ids, chosen, rejected, pair.images

    def __getitem__(self, i: int) -> PairSample:
        prompt, chosen, rejected, images = self.tokens(i)
        pixel_values = None
        if images:
            if self.image_spec is None:
                raise ValueError("these pairs have images: pass image_spec (vlmforge.arch.geometry.image_preprocess_spec)")
            try:
                root = self.index.image_root(i)
                paths = [resolve_inside(root, p, allow_absolute=self.allow_absolute_paths, dir_cache=self._dirs)
                         for p in images]
                pixel_values = torch.stack([load_pixels(str(p), self.image_spec) for p in paths])
            except (PathOutsideRootError, SFTDataError) as e:
                raise PreferenceDataError(f"{self.index.where(i)}: {e}", e.reason) from None
        return PairSample(int(i), prompt, chosen, rejected, pixel_values)


class _Jobs(tud.IterableDataset):
    """Items ``make(j)`` for j = start + worker id + k * workers (in DataLoader workers or here)."""

    def __init__(self, make: Callable[[int], dict], start: int, stop: int):
        self.make, self.start, self.stop = make, start, stop

    def __iter__(self):
        info = tud.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(self.start + wid, self.stop, nw):
            yield self.make(j)


def _as_is(item):
    return item


class PreferenceLoader:
    """Deterministic, resumable micro-batches of preference pairs for one rank.

    The SFT loader's protocol: ``iter(loader)`` yields the rest of the current epoch, after which the
    next epoch is current; ``set_epoch(e)``; ``state_dict()`` / ``load_state_dict()`` (exact resume);
    ``batches_per_epoch(epoch)``; ``skipped`` (reason -> count); ``epoch``; ``forever()``. Plus
    :meth:`reference_batches` and ``num_pairs`` (valid pairs in the index)."""

    def __init__(
        self,
        samples: PreferenceSamples,
        cfg: PreferenceDataConfig,
        *,
        batch_size: int,
        layout: str,
        pad_id: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pack_pairs: bool = True,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"preference layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples = samples
        self.cfg = cfg
        self.layout = layout
        self.batch_size = int(batch_size)
        self.pad_id = int(pad_id if pad_id is not None else samples.tok.pad_token_id)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world_size)
        self.max_len = int(cfg.max_len)
        self.strict = bool(cfg.strict)
        self.num_workers = int(cfg.num_workers)
        self.pack_pairs = bool(pack_pairs)
        self.epoch, self.batch = 0, 0
        self.skipped: dict[str, int] = {}
        self.reference_skipped: dict[str, int] = {}
        longest = samples.index.longest_row(samples.visual_tokens)
        self.valid = np.flatnonzero(longest <= self.max_len)
        too_long = len(longest) - self.valid.size
        if too_long:
            self.skipped["prompt_too_long"] = int(too_long)
        self._plan_key: int | None = None
        self._plan: np.ndarray | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.valid.size)

    # -- plan ---------------------------------------------------------------------------
    def plan(self, epoch: int) -> np.ndarray:
        """The epoch's pair order (record numbers); global micro-batch g is ``order[g*bs:(g+1)*bs]``."""
        if self._plan_key != epoch:
            rng = np.random.default_rng([self.seed, int(epoch)])
            self._plan = rng.permutation(self.valid) if self.cfg.shuffle else self.valid
            self._plan_key = epoch
        return self._plan

    def batches_per_epoch(self, epoch: int = 0) -> int:
        n_batches = -(-int(self.plan(epoch).size) // self.batch_size)
        return n_batches // self.world

    # -- state --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first micro-batch (no-op if it is already the current epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "pairs": self.num_pairs, "world_size": self.world,
                "batch_size": self.batch_size, "layout": self.layout}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "skipped": dict(self.skipped), **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in self._fingerprint().items():
            if key in state and state[key] != mine:
                raise PreferenceDataError(
                    f"preference loader state has {key}={state[key]!r} but this run has {mine!r}: cannot resume exactly"
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped = dict(state.get("skipped", {}))

    # -- building -----------------------------------------------------------------------
    def _sample(self, i: int, skipped: dict) -> PairSample | None:
        try:
            return self.samples[int(i)]
        except PreferenceDataError as e:
            if self.strict:
                raise
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            return None

    def collate(self, records, skipped: dict) -> dict | None:
        """The micro-batch of these records (bad ones skipped into ``skipped``); None if none is left."""
        samples = [s for s in (self._sample(i, skipped) for i in records) if s is not None]
        if not samples:
            return None
        return build_batch(samples, self.layout, self.pad_id, self.max_len, self.pack_pairs)

    def build_batch(self, epoch: int, j: int) -> dict:
        """Rank-local micro-batch ``j`` of ``epoch`` (global micro-batch ``j * world + rank``)."""
        order = self.plan(epoch)
        g = j * self.world + self.rank
        skipped: dict[str, int] = {}
        batch = self.collate(order[g * self.batch_size : (g + 1) * self.batch_size], skipped)
        return {"batch": batch, "skipped": skipped, "j": j}

    def _items(self, make: Callable[[int], dict], start: int, stop: int) -> Iterator[dict]:
        jobs = _Jobs(make, start, stop)
        if self.num_workers <= 0:
            yield from jobs
            return
        yield from tud.DataLoader(jobs, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                                  persistent_workers=False)

    # -- iteration ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the next epoch is current."""
        epoch = self.epoch
        n_local = self.batches_per_epoch(epoch)
        if n_local == 0:
            raise PreferenceDataError(
                f"the preference data gives no micro-batch per rank (valid pairs {self.num_pairs}, batch_size "
                f"{self.batch_size}, world size {self.world}, max_len {self.max_len})"
            )
        for item in self._items(partial(self.build_batch, epoch), self.batch, n_local):
            for k, v in item["skipped"].items():
                self.skipped[k] = self.skipped.get(k, 0) + v
            self.batch = item["j"] + 1
            if item["batch"] is not None:
                yield item["batch"]
        self.epoch, self.batch = epoch + 1, 0

    def forever(self) -> Iterator[dict]:
        while True:
            yield from self

    # -- reference log-probs --------------------------------------------------------------
    def reference_pairs(self) -> np.ndarray:
        """This rank's share of the valid pairs (record numbers, in index order)."""
        return self.valid[self.rank :: self.world]

    def reference_batch_count(self, batch_size: int) -> int:
        """Micro-batches of :meth:`reference_batches` on the rank with the most (ranks differ by at most
        one; a sharded model needs every rank in each forward, so the others run that many too)."""
        most = -(-self.num_pairs // self.world)
        return -(-most // int(batch_size))

    def _reference_item(self, mine: np.ndarray, bs: int, j: int) -> dict:
        skipped: dict[str, int] = {}
        return {"batch": self.collate(mine[j * bs : (j + 1) * bs], skipped), "skipped": skipped, "j": j}

    def reference_batches(self, batch_size: int) -> Iterator[dict]:
        """This rank's valid pairs once each, in index order, ``batch_size`` pairs per batch, in this
        loader's layout (a pair that cannot be loaded is skipped, counted in ``reference_skipped``)."""
        mine = self.reference_pairs()
        bs = int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for item in self._items(partial(self._reference_item, mine, bs), 0, -(-mine.size // bs)):
            for k, v in item["skipped"].items():
                self.reference_skipped[k] = self.reference_skipped.get(k, 0) + v
            if item["batch"] is not None:
                yield item["batch"]


def build_preference_loader(
    cfg: Recipe,
    tokenizer,
    *,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    visual_tokens: int,
    image_spec: dict,
    layout: str,
) -> PreferenceLoader:
    """The loader an MPO run uses: index ``preference.index``, ``batch_size`` pairs per micro-batch
    (``train.micro_batch_size``), images preprocessed by ``image_spec`` and expanded to
    ``visual_tokens`` tokens, ``layout`` "shared" | "duplicated" (resolved by the caller from
    ``preference.layout`` and the model).

    The shared layout needs ``model.positions: restart`` (its rejected positions restart from the
    prompt's end; ``continue`` and ``v2pe`` compute their own). It packs several pairs per row in
    either attention mode: the branch mask keeps a row's pairs from seeing each other."""
    pref = cfg.preference
    if not pref.index:
        raise PreferenceDataError(
            "preference.index is not set: build one with `vlmforge preference index` and set preference.index=DIR"
        )
    if layout not in LAYOUTS:
        raise ConfigError(f"preference layout must be one of {', '.join(LAYOUTS)} here, got {layout!r}")
    if layout == "shared" and cfg.model.positions != "restart":
        raise ConfigError(
            f"preference.layout=shared needs model.positions=restart (got {cfg.model.positions!r}): the rejected "
            "response's positions continue from the prompt's end; use preference.layout=duplicated"
        )
    if not os.path.isdir(pref.index):
        raise PreferenceDataError(f"preference.index {pref.index}: no such folder (build it with `vlmforge preference index`)")
    index = open_preference_index(pref.index)
    theirs = index.manifest.get("tokenizer_fingerprint") or {}
    mine = tokenizer_fingerprint(tokenizer)
    if theirs.get("sha256") not in (None, mine["sha256"]):
        raise PreferenceDataError(
            f"preference.index {pref.index} was built with tokenizer {index.manifest.get('tokenizer')} "
            f"(sha256 {theirs['sha256'][:12]}) but this run's tokenizer has sha256 {mine['sha256'][:12]}: "
            "rebuild the index with this run's tokenizer (`vlmforge preference index --tokenizer ...`)"
        )
    samples = PreferenceSamples(index, tokenizer, visual_tokens=visual_tokens, image_spec=image_spec,
                                allow_absolute_paths=pref.allow_absolute_paths)
    return PreferenceLoader(samples, pref, batch_size=batch_size, layout=layout, seed=seed, rank=rank,
                            world_size=world_size)
