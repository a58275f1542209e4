"""SFT data section (owned by vlmforge.data.sft): index building and batching."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from vlmforge.config.ranges import ranged


@dataclass
class SFTDataConfig:
    # LLaVA-format sources (.json arrays or .jsonl) that `vlmforge sft-index` indexes, or InternVL
    # meta files (named sources, each with its own root, repeat_time, data_augment, max_dynamic_patch).
    sources: List[str] = field(default_factory=list)
    # The index folder (written by `vlmforge sft-index`, read by SFT training).
    index: Optional[str] = None
    # Folder image paths in the records are relative to (a meta file's sources bring their own root).
    image_root: Optional[str] = None
    # Paths must stay inside image_root (symlinks resolved): others are skipped as path_outside_root.
    # True: also accept absolute image paths (read as they are); relative ones are still checked.
    allow_absolute_paths: bool = False
    # Token lengths in the index: "exact" (tokenizer, the packer's input) or "estimate" (fast).
    lengths: Literal["exact", "estimate"] = "exact"
    check_images: bool = True
    # Bad samples (unparsable JSON, missing/undecodable image, too long) are skipped and counted;
    # strict: raise instead, naming file and line.
    strict: bool = False
    index_workers: int = ranged(1, ge=1)
    # Batching: "pack" (conversations packed into rows of max_len, never split) or
    # "length_group" (one conversation per row, rows of similar length batched, padded).
    # Rows per batch per rank are the trainer's train.micro_batch_size.
    batching: Literal["pack", "length_group"] = "pack"
    max_len: int = ranged(4096, ge=1)
    pack_window: int = ranged(10000, ge=1)  # records planned together by the packer
    group_factor: int = ranged(32, ge=1)  # length_group: sort within mega-batches of micro_batch_size x group_factor
    shuffle: bool = True
    # Training only: re-encode each image (each tile, with model.images.tiles) as JPEG at a quality
    # drawn from 75..100 (InternVL's augmentation), deterministic per (seed, epoch, record, tile).
    # For plain record files; a meta file's sources follow their own data_augment.
    jpeg_augment: bool = False
    drop_last: bool = True  # drop the epoch's last, incomplete batch
    num_workers: int = ranged(0, ge=0)
