"""Preference data section (owned by vlmforge.data.preference): indexing pairs and batching them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from vlmforge.config.ranges import ranged


@dataclass
class PreferenceDataConfig:
    # Pair sources that `vlmforge preference index` reads: MMPR-style .jsonl (image, question,
    # chosen, rejected[, answer_gt]), InternVL meta .json (name -> root, annotation, repeat_time),
    # or vlmforge synth's preference/pairs.jsonl (image, prompt, chosen, rejected).
    sources: List[str] = field(default_factory=list)
    # The index folder (written by `vlmforge preference index`, read by `train.stage: mpo`).
    index: Optional[str] = None
    # Folder image paths in the rows are relative to (meta.json sources bring their own root).
    image_root: Optional[str] = None
    allow_absolute_paths: bool = False
    # Bad rows are skipped and counted by reason (file:line in the manifest); strict: stop at the first.
    strict: bool = False
    # Longest row in tokens (visual tokens included); a pair whose prompt + response does not fit is skipped.
    max_len: int = ranged(4096, ge=1)
    # shared: [prompt][chosen][rejected] in one row, several pairs per row (needs an explicit-mask
    # attention backend); duplicated: [prompt chosen] and [prompt rejected] rows (the InternVL / TRL
    # layout); auto: shared unless the backend is flash-attn varlen or positions are v2pe.
    layout: Literal["auto", "shared", "duplicated"] = "auto"
    # micro-batches count pairs (train.micro_batch_size / global_batch_size are pairs in mpo)
    shuffle: bool = True
    num_workers: int = ranged(0, ge=0)
