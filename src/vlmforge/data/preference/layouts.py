"""Preference pairs -> one micro-batch, in the shared-prompt or the duplicated layout.

Both give the batch format of the preference contract (``pred_index`` / ``target_ids`` /
``target_pair`` / ``target_side`` / ``pair_ids``, see :mod:`vlmforge.data.preference`), so the model
computes per-pair log-prob sums the same way from either (``output="target_logprobs"``, then a
scatter-add by ``target_pair`` and ``target_side``):

- **shared**: ``[prompt][chosen][rejected]`` per pair in one row, the rejected response's positions
  continuing from the prompt's end (the same positions as chosen's), ``branch_ids`` 0 / 1 / 2 so
  that rejected attends to the prompt and itself but never to chosen; the prompt, with its visual
  tokens, is computed once per pair and each image encoded once. Shorter pairs share a row up to
  the width of the micro-batch's longest pair, at most ``max_len`` (:func:`shared_rows`,
  :func:`vlmforge.data.packer.plan_packs`; ``seq_ids`` = pair slot in the row, which the model's
  ``document`` attention keeps apart). The first rejected token is predicted from the
  prompt's last position, like the first chosen token.
- **duplicated**: rows ``2p`` = prompt + chosen and ``2p + 1`` = prompt + rejected, right-padded
  (the InternVL / TRL layout, for attention backends without an explicit mask), each pair's images
  once in ``pixel_values`` and twice in ``image_map``.

Pairs are numbered in order of appearance in the rows, so ``pixel_values`` follows the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vlmforge.data.packer import plan_packs

LAYOUTS = ("shared", "duplicated")


@dataclass
class PairSample:
    """One pair's token ids (prompt with each image expanded to its visual tokens) and images."""

    pair_id: int
    prompt: np.ndarray  # int64
    chosen: np.ndarray  # int64, reply + end-of-turn id
    rejected: np.ndarray
    pixel_values: torch.Tensor | None = None  # [n_images, 3, H, W]

    @property
    def shared_length(self) -> int:
        return int(self.prompt.size + self.chosen.size + self.rejected.size)


def shared_rows(samples: Sequence[PairSample], max_len: int, pack_pairs: bool = True) -> list[list[int]]:
    """Which pairs share a row. Rows are as wide as the longest pair (prompt + both responses) of
    the micro-batch, at most ``max_len``: shorter pairs share rows up to that width, so packing
    removes padding without widening the rows (with an explicit mask, attention work grows with the
    square of the row width). A pair longer than ``max_len`` takes a row of its own."""
    if not pack_pairs or len(samples) < 2:
        return [[k] for k in range(len(samples))]
    lengths = np.array([s.shared_length for s in samples], dtype=np.int64)
    width = int(min(max_len, lengths.max()))
    return [[int(k) for k in pack] for pack in plan_packs(np.minimum(lengths, width), width)]


def shared_batch(samples: Sequence[PairSample], pad_id: int, max_len: int, pack_pairs: bool = True) -> dict:
    """The shared-prompt layout of ``samples`` (see the module docstring)."""
    if not samples:
        raise ValueError("shared_batch: no pairs")
    rows = shared_rows(samples, max_len, pack_pairs)
    width = max(sum(samples[k].shared_length for k in row) for row in rows)
    n_rows = len(rows)
    input_ids = np.full((n_rows, width), int(pad_id), np.int64)
    position_ids = np.zeros((n_rows, width), np.int64)
    seq_ids = np.full((n_rows, width), -1, np.int64)
    branch_ids = np.full((n_rows, width), -1, np.int64)
    t = _Targets()
    order: list[PairSample] = []
    for r, row in enumerate(rows):
        at = 0
        for slot, k in enumerate(row):
            s = samples[k]
            p, c, n = s.prompt.size, s.chosen.size, s.shared_length
            input_ids[r, at : at + n] = np.concatenate([s.prompt, s.chosen, s.rejected])
            seq_ids[r, at : at + n] = slot
            branch_ids[r, at : at + p] = 0
            branch_ids[r, at + p : at + p + c] = 1
            branch_ids[r, at + p + c : at + n] = 2
            position_ids[r, at : at + p + c] = np.arange(p + c)
            position_ids[r, at + p + c : at + n] = np.arange(p, p + s.rejected.size)
            base = r * width + at
            last_prompt = base + p - 1
            # target j of a response starting at column q is predicted at q + j - 1; j = 0 at the prompt's end
            t.add(len(order), 0, s.chosen, np.concatenate([[last_prompt], base + p + np.arange(c - 1)]))
            t.add(len(order), 1, s.rejected,
                  np.concatenate([[last_prompt], base + p + c + np.arange(s.rejected.size - 1)]))
            order.append(s)
            at += n
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "seq_ids": torch.from_numpy(seq_ids),
        "branch_ids": torch.from_numpy(branch_ids),
        **t.tensors(),
        "pair_ids": torch.tensor([s.pair_id for s in order], dtype=torch.long),
    }
    images = [s.pixel_values for s in order if s.pixel_values is not None and s.pixel_values.shape[0]]
    if images:
        batch["pixel_values"] = torch.cat(images, 0)
    return batch


def duplicated_batch(samples: Sequence[PairSample], pad_id: int) -> dict:
    """The duplicated layout of ``samples``: rows 2p (prompt + chosen) and 2p + 1 (prompt + rejected)."""
    if not samples:
        raise ValueError("duplicated_batch: no pairs")
    width = max(s.prompt.size + max(s.chosen.size, s.rejected.size) for s in samples)
    n_rows = 2 * len(samples)
    input_ids = np.full((n_rows, width), int(pad_id), np.int64)
    position_ids = np.zeros((n_rows, width), np.int64)
    seq_ids = np.full((n_rows, width), -1, np.int64)
    t = _Targets()
    images, image_map, n_images = [], [], 0
    for k, s in enumerate(samples):
        p = s.prompt.size
        for side, resp in enumerate((s.chosen, s.rejected)):
            r, n = 2 * k + side, p + resp.size
            input_ids[r, :n] = np.concatenate([s.prompt, resp])
            seq_ids[r, :n] = 0
            position_ids[r, :n] = np.arange(n)
            t.add(k, side, resp, r * width + p - 1 + np.arange(resp.size))
        m = 0 if s.pixel_values is None else int(s.pixel_values.shape[0])
        if m:
            images.append(s.pixel_values)
            image_map += list(range(n_images, n_images + m)) * 2  # chosen's row, then rejected's
            n_images += m
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "seq_ids": torch.from_numpy(seq_ids),
        **t.tensors(),
        "pair_ids": torch.tensor([s.pair_id for s in samples], dtype=torch.long),
    }
    if images:
        batch["pixel_values"] = torch.cat(images, 0)
        batch["image_map"] = torch.tensor(image_map, dtype=torch.long)
    return batch


def build_batch(samples: Sequence[PairSample], layout: str, pad_id: int, max_len: int, pack_pairs: bool = True) -> dict:
    if layout == "shared":
        return shared_batch(samples, pad_id, max_len, pack_pairs)
    if layout == "duplicated":
        return duplicated_batch(samples, pad_id)
    raise ValueError(f"preference layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


class _Targets:
    """Target columns collected pair by pair, in order."""

    def __init__(self):
        self.pred, self.ids, self.pair, self.side = [], [], [], []

    def add(self, pair: int, side: int, ids: np.ndarray, pred: np.ndarray) -> None:
        self.pred.append(np.asarray(pred, np.int64))
        self.ids.append(np.asarray(ids, np.int64))
        self.pair.append(np.full(ids.size, pair, np.int64))
        self.side.append(np.full(ids.size, side, np.int64))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "pred_index": torch.from_numpy(np.concatenate(self.pred)),
            "target_ids": torch.from_numpy(np.concatenate(self.ids)),
            "target_pair": torch.from_numpy(np.concatenate(self.pair)),
            "target_side": torch.from_numpy(np.concatenate(self.side)),
        }
