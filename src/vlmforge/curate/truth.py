"""Score a curation run against a ground-truth fault file (the synthetic world's ``faults.jsonl``).

One JSON object per line naming a faulty sample by ``key`` (its key in the tar) and the fault in
``fault`` (or ``kind`` / ``type``), e.g. ``{"key": "000000012", "fault": "mismatch"}``. Samples not
listed are clean. The metrics go into the stage manifest (``ground_truth``).
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

MISMATCH = ("mismatch", "mismatched_caption", "caption_mismatch")
EXACT_DUP = ("exact_duplicate", "exact_dup", "duplicate")
NEAR_DUP = ("near_duplicate", "near_dup")


def load_truth(path: str | os.PathLike) -> dict[str, str]:
    """key -> fault kind."""
    from vlmforge.cli import UserError

    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{n}: not JSON: {e}") from None
            key = rec.get("key")
            kind = rec.get("fault") or rec.get("kind") or rec.get("type")
            if key is None or kind is None:
                raise UserError(f"{path}:{n}: a fault record needs 'key' and 'fault' (got {sorted(rec)})")
            out[str(key)] = str(kind)
    return out


def _kinds(truth: dict, keys: list) -> np.ndarray:
    return np.array([truth.get(k, "clean") for k in keys], dtype=object)


def _rate(num: int, den: int):
    return None if den == 0 else num / den


def filter_metrics(truth: dict, shards, table, keep: np.ndarray, valid: np.ndarray) -> dict:
    """Mismatch detection among decodable samples: recall (mismatched removed), clean kept, precision."""
    kinds = _kinds(truth, table.column("key").to_pylist())
    mis = np.isin(kinds, MISMATCH) & valid
    clean = (kinds == "clean") & valid
    dropped = valid & ~keep
    removed_mis = int((mis & dropped).sum())
    out = {
        "mismatched": int(mis.sum()),
        "mismatched_removed": removed_mis,
        "mismatch_recall": _rate(removed_mis, int(mis.sum())),
        "clean": int(clean.sum()),
        "clean_kept": int((clean & keep).sum()),
        "clean_kept_frac": _rate(int((clean & keep).sum()), int(clean.sum())),
        # of everything this filter removed (valid samples), the share that was a mismatch
        "precision": _rate(removed_mis, int(dropped.sum())),
        "removed_by_fault": dict(Counter(kinds[dropped].tolist())),
        "corrupt_by_fault": dict(Counter(kinds[~valid].tolist())),
    }
    return out


def dedup_metrics(truth: dict, table, keep: np.ndarray, reason: list, valid: np.ndarray) -> dict:
    kinds = _kinds(truth, table.column("key").to_pylist())
    exact = np.isin(kinds, EXACT_DUP) & valid
    near = np.isin(kinds, NEAR_DUP) & valid
    clean = (kinds == "clean") & valid
    reasons = np.array([r or "" for r in reason], dtype=object)
    exact_removed = int((exact & ~keep).sum())
    near_removed = int((near & ~keep).sum())
    return {
        "exact_duplicates_injected": int(exact.sum()),
        "exact_duplicates_removed": exact_removed,
        "exact_duplicates_missed_keys": table.column("key").to_numpy(zero_copy_only=False)[exact & keep].tolist()[:20],
        "near_duplicates_injected": int(near.sum()),
        "near_duplicates_removed": near_removed,
        "clean_removed": int((clean & ~keep).sum()),
        "removed_by_fault": {f"{k}|{r}": v for (k, r), v in
                             Counter(zip(kinds[valid & ~keep].tolist(), reasons[valid & ~keep].tolist())).items()},
    }
