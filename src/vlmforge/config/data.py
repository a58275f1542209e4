"""Packing and data-loading sections (owned by vlmforge.data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from vlmforge.config.ranges import ranged


@dataclass
class PackConfig:
    """`vlmforge pack`: caption shards -> packed shards (the visual-token count comes from `model`)."""

    max_len: int = ranged(4096, ge=1)  # tokens per pack (visual tokens + caption + separator, summed over samples)
    window: int = ranged(10000, ge=1)  # samples planned together; one packed output shard per window
    method: Literal["auto", "exact", "ffd"] = "auto"  # see vlmforge.data.packer.plan_packs
    carry_over: bool = True  # the emptiest pack of a window (if < 99% full) is re-planned with the next window
    too_long: Literal["truncate", "drop"] = "truncate"  # cut the caption, or drop; both counted in the manifest
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it
    check_images: bool = True  # fully decode every image at pack time (bad ones are skipped and counted)
    threads: int = ranged(2, ge=1)  # threads decoding images for the check (PIL releases the GIL)
    # Text-only mixing (InternVL3-style native multimodal pretraining): .txt (one document per
    # line) or .jsonl ({"text": ...}) files/globs; text tokens per multimodal token, e.g. 1:3 -> 0.3333.
    text_corpus: Optional[str] = None
    text_ratio: float = ranged(0.0, ge=0)
    text_chunk_len: int = ranged(1024, ge=1)  # longer documents are split into chunks of at most this many tokens
    hist_bins: int = ranged(32, ge=1)  # length histogram bins in the manifest


@dataclass
class DataConfig:
    """The packed-sequence loader used in pretraining (batch size / data path live in `train`)."""

    num_workers: int = ranged(0, ge=0)  # DataLoader worker processes per rank
    shuffle: bool = True  # seeded per epoch (recipe seed + epoch)
    # restart: position ids start at 0 per sample; continue: they run on across the pack
    positions: Literal["restart", "continue"] = "restart"
    supervise_sep: bool = True  # learn to predict <|im_end|> after each caption
    pad_to_max_len: bool = True  # pad rows to pack.max_len (static shapes) instead of the longest row
    # Equal batch count per rank (no DDP hang): wrap = fill the last global batch with packs from the
    # start of the epoch (every pack seen); drop = leave the incomplete last global batch out.
    remainder: Literal["wrap", "drop"] = "wrap"
    strict: bool = False  # raise on an undecodable image instead of dropping that sample from its pack
