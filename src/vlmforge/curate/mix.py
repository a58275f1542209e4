"""``curate mix``: combine sources with target ratios into one set of shards.

``--source NAME=SHARDS:WEIGHT`` (repeatable). Weights are normalised to ratios. Without ``--total``
the mix is the largest one that meets the ratios without repeating a sample
(``total = min_s valid_s / ratio_s``); with ``--total`` a source that is too small is an error
(no silent oversampling). Each source contributes its first ``k_s`` valid samples in input order;
the rest are dropped as ``mix_surplus``. Output order interleaves the sources evenly (sample ``i``
of source ``s`` sits at virtual time ``(i + 0.5) / k_s``), so every output shard has the target
ratio and reads a contiguous window of each source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlmforge.curate.reshard import DecideResult
from vlmforge.errors import UserError


@dataclass
class MixSource:
    name: str
    shards: str
    weight: float


def parse_source(text: str) -> MixSource:
    if "=" not in text:
        raise UserError(f"--source {text!r}: expected NAME=SHARDS:WEIGHT")
    name, rest = text.split("=", 1)
    path, sep, w = rest.rpartition(":")
    if not sep:
        raise UserError(f"--source {text!r}: expected NAME=SHARDS:WEIGHT (weight missing)")
    try:
        weight = float(w)
    except ValueError:
        raise UserError(f"--source {text!r}: weight {w!r} is not a number") from None
    if weight <= 0:
        raise UserError(f"--source {text!r}: weight must be > 0")
    return MixSource(name=name, shards=path, weight=weight)


def plan_counts(avail: dict[str, int], weights: dict[str, float], total: int | None) -> dict[str, int]:
    """Samples taken per source: proportional to weights, largest-remainder rounding."""
    z = sum(weights.values())
    ratio = {s: w / z for s, w in weights.items()}
    if total is None:
        total = min(math.floor(avail[s] / ratio[s] + 1e-9) for s in ratio)
    raw = {s: total * ratio[s] for s in ratio}
    counts = {s: int(math.floor(v)) for s, v in raw.items()}
    left = total - sum(counts.values())
    for s in sorted(raw, key=lambda s: raw[s] - counts[s], reverse=True)[:left]:
        counts[s] += 1
    short = {s: (counts[s], avail[s]) for s in counts if counts[s] > avail[s]}
    if short:
        msg = ", ".join(f"{s} needs {need} but has {have} valid samples" for s, (need, have) in short.items())
        raise UserError(f"mix total {total} cannot be met without repeating samples: {msg}")
    return counts


def make_decide(sources: list[str], weights: dict[str, float], total: int | None):
    """sources: source name per input shard (reshard.Job.sources)."""

    def decide(table, valid: np.ndarray) -> DecideResult:
        n = table.num_rows
        src = np.array(sources, dtype=object)[table.column("in_index").to_numpy()]
        avail = {s: int((valid & (src == s)).sum()) for s in weights}
        counts = plan_counts(avail, weights, total)
        keep = np.zeros(n, dtype=bool)
        order = np.zeros(n, dtype=np.float64)
        for s, k in counts.items():
            rows = np.flatnonzero(valid & (src == s))[:k]
            keep[rows] = True
            order[rows] = (np.arange(len(rows)) + 0.5) / max(k, 1)
        reason = [None if keep[i] else "mix_surplus" for i in range(n)]
        total_taken = sum(counts.values())
        report = {
            "mix": {
                s: {"weight": weights[s], "target_ratio": weights[s] / sum(weights.values()),
                    "valid": avail[s], "taken": counts[s],
                    "ratio": counts[s] / total_taken if total_taken else 0.0}
                for s in counts
            }
        }
        return DecideResult(keep=keep, reason=reason, order=order, report=report)

    return decide
