"""Samples -> the training batch contract shared by both data paths (pretraining and SFT).

A *sample* is a mapping with
  - ``input_ids``: 1-D ints, each image already expanded into N ``<image>`` ids;
  - ``labels`` (optional, default: a copy of input_ids): same length, -100 where no loss;
  - ``pixel_values`` (optional): FloatTensor[n_images, 3, H, W] for the images of this sample.
A *pack* is a list of samples that share one row. ``collate_packs`` concatenates each pack,
sets label -100 on the first token of every sample (nothing learns to predict across a
sample boundary) and on padding, builds position ids (restarting per sample, or continuing
across the pack) and seq_ids (sample index within the row, -1 on padding), and stacks all
images of the batch in order of appearance.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
POSITION_MODES = ("restart", "continue")


def sample_length(sample: Mapping[str, Any]) -> int:
    return len(sample["input_ids"])


def collate_packs(
    packs: Sequence[Sequence[Mapping[str, Any]]],
    pad_id: int,
    pad_to: int | None = None,
    positions: str = "restart",
) -> dict[str, torch.Tensor]:
    """Batch of packs -> dict(input_ids, labels, position_ids, seq_ids[, pixel_values]).

    Rows are padded to ``pad_to`` (error if a pack is longer) or, if None, to the longest row.
    ``positions``: "restart" (0.. per sample) or "continue" (0.. across the whole row).
    ``pixel_values`` is present only if some sample carries images.
    """
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    if not packs:
        raise ValueError("collate_packs: empty batch")
    row_lens = [sum(sample_length(s) for s in pack) for pack in packs]
    width = max(row_lens) if pad_to is None else int(pad_to)
    for r, n in enumerate(row_lens):
        if n > width:
            raise ValueError(f"pack {r} has {n} tokens > pad_to={width}")
    B = len(packs)
    input_ids = np.full((B, width), pad_id, dtype=np.int64)
    labels = np.full((B, width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, width), dtype=np.int64)
    seq_ids = np.full((B, width), -1, dtype=np.int64)
    images: list[torch.Tensor] = []
    for r, pack in enumerate(packs):
        at = 0
        for j, s in enumerate(pack):
            ids = np.asarray(s["input_ids"], dtype=np.int64)
            n = ids.size
            if n == 0:
                raise ValueError(f"pack {r} sample {j} is empty")
            lab = s.get("labels")
            lab = ids if lab is None else np.asarray(lab, dtype=np.int64)
            if lab.size != n:
                raise ValueError(f"pack {r} sample {j}: labels length {lab.size} != input_ids length {n}")
            input_ids[r, at : at + n] = ids
            labels[r, at : at + n] = lab
            labels[r, at] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
            seq_ids[r, at : at + n] = j
            position_ids[r, at : at + n] = np.arange(n) if positions == "restart" else np.arange(at, at + n)
            pv = s.get("pixel_values")
            if pv is not None:
                images.append(pv if pv.dim() == 4 else pv.unsqueeze(0))
            at += n
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "seq_ids": torch.from_numpy(seq_ids),
    }
    if images:
        batch["pixel_values"] = _stack_images(images)
    return batch


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [n_i, 3, H, W] tensors. If they are consecutive views covering one buffer
    (one pack's images, see vlmforge.data.pretrain.loader.PackedDataset) that buffer is returned without a copy; otherwise one
    numpy concatenation (cheaper than torch.cat for large CPU tensors)."""
    base = images[0]._base
    if base is not None and all(im._base is base and im.is_contiguous() for im in images):
        step = images[0][0].numel() * images[0].element_size()
        at = base.data_ptr()
        for im in images:
            if im.data_ptr() != at:
                break
            at += im.shape[0] * step
        else:
            if at == base.data_ptr() + base.shape[0] * step and base.is_contiguous():
                return base
    if all(im.device.type == "cpu" and not im.requires_grad for im in images):
        return torch.from_numpy(np.concatenate([im.numpy() for im in images], 0))
    return torch.cat(images, 0)
