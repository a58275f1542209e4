"""Score a curation run against a ground-truth fault file (the synthetic world's ``faults.jsonl``).

One JSON object per line naming a faulty sample by ``key`` (its key in the tar) and the fault in
``fault`` (or ``kind`` / ``type``), e.g. ``{"key": "000000012", "fault": "mismatch"}``; duplicates may
name their source with ``duplicate_of_key``. Samples not listed are clean. The metrics go into
the stage manifest (``ground_truth``).

Duplicates are scored per group (a source and its injected copies): copies are byte-identical (or
nearly), so which member survives is arbitrary; what matters is that exactly one does.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

from vlmforge.errors import UserError
from vlmforge.files import numbered_lines

MISMATCH = ("mismatch", "mismatched_caption", "caption_mismatch")
EXACT_DUP = ("exact_duplicate", "exact_dup", "duplicate")
NEAR_DUP = ("near_duplicate", "near_dup")


class Truth(dict):
    """key -> fault kind, plus ``dup_of``: duplicate key -> the key it copies."""

    dup_of: dict


def load_truth(path: str | os.PathLike) -> Truth:
    """key -> fault kind (and ``.dup_of``)."""
    out = Truth()
    out.dup_of = {}
    for where, line in numbered_lines(path):
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not JSON: {e}") from None
        key = rec.get("key")
        kind = rec.get("fault") or rec.get("kind") or rec.get("type")
        if key is None or kind is None:
            raise UserError(f"{where}: a fault record needs 'key' and 'fault' (got {sorted(rec)})")
        out[str(key)] = str(kind)
        if rec.get("duplicate_of_key") is not None:
            out.dup_of[str(key)] = str(rec["duplicate_of_key"])
    return out


def _truth_keys(table) -> list:
    """Keys as the fault file knows them: a resharded sample keeps its first key as ``origin_key``."""
    col = "origin_key" if "origin_key" in table.column_names else "key"
    return table.column(col).to_pylist()


def _kinds(truth: dict, keys: list) -> np.ndarray:
    return np.array([truth.get(k, "clean") for k in keys], dtype=object)


def _rate(num: int, den: int):
    return None if den == 0 else num / den


def filter_metrics(truth: dict, shards, table, keep: np.ndarray, valid: np.ndarray) -> dict:
    """Mismatch detection among decodable samples: recall (mismatched removed), clean kept, precision."""
    kinds = _kinds(truth, _truth_keys(table))
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
        # of everything removed, the share that was any injected fault (empty caption, grayscale, ...)
        "precision_any_fault": _rate(int((dropped & (kinds != "clean")).sum()), int(dropped.sum())),
        "removed_by_fault": dict(Counter(kinds[dropped].tolist())),
        "corrupt_by_fault": dict(Counter(kinds[~valid].tolist())),
    }
    return out


def _group_stats(truth, kinds_wanted, keys: list, keep: np.ndarray, valid: np.ndarray) -> dict:
    """Groups {source, copies...} of the given duplicate kinds: how many copies remain beyond one."""
    dup_of = getattr(truth, "dup_of", {}) or {}
    row = {k: i for i, k in enumerate(keys)}
    groups: dict[str, list] = {}
    for k, kind in truth.items():
        if kind in kinds_wanted:
            groups.setdefault(dup_of.get(k, k), []).append(k)
    injected = sum(len(v) for v in groups.values())
    left = resolved = 0
    for src, copies in groups.items():
        members = [m for m in [src, *copies] if m in row and valid[row[m]]]
        kept = sum(1 for m in members if keep[row[m]])
        left += max(0, kept - 1)
        resolved += kept == 1
    return {"injected": injected, "groups": len(groups), "groups_with_one_copy_left": resolved,
            "redundant_copies_left": left, "removed": injected - left}


def dedup_metrics(truth: dict, table, keep: np.ndarray, reason: list, valid: np.ndarray) -> dict:
    keys = _truth_keys(table)
    kinds = _kinds(truth, keys)
    reasons = np.array([r or "" for r in reason], dtype=object)
    exact = _group_stats(truth, EXACT_DUP, keys, keep, valid)
    near = _group_stats(truth, NEAR_DUP, keys, keep, valid)
    # a clean sample removed is fine when it is the source of an injected copy that was kept instead
    sources = set((getattr(truth, "dup_of", {}) or {}).values())
    clean_removed = [k for k, kd, kp, v in zip(keys, kinds, keep, valid) if v and not kp and kd == "clean" and k not in sources]
    return {
        "exact": exact,  # per kind: injected, removed, groups, groups_with_one_copy_left, redundant_copies_left
        "near": near,
        "exact_duplicates_injected": exact["injected"],
        "exact_duplicates_removed": exact["removed"],
        "exact_duplicate_groups_with_one_copy_left": f"{exact['groups_with_one_copy_left']}/{exact['groups']}",
        "near_duplicates_injected": near["injected"],
        "near_duplicates_removed": near["removed"],
        "near_duplicate_groups_with_one_copy_left": f"{near['groups_with_one_copy_left']}/{near['groups']}",
        "clean_removed": len(clean_removed),
        "clean_removed_examples": clean_removed[:20],
        "removed_by_fault": {f"{k}|{r}": v for (k, r), v in
                             Counter(zip(kinds[valid & ~keep].tolist(), reasons[valid & ~keep].tolist())).items()},
    }
