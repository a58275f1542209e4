"""``curate filter``: keep samples by score thresholds, top fractions and uid subsets.

Criteria (strings, combined with ``and`` / ``or``):

- ``NAME.COL>=X`` (also ``>``, ``<=``, ``<``): a score column from the sidecars of ``--scores NAME=DIR``
  (``NAME>=X`` means column ``score``). ``X`` may be ``calibrated``: the threshold the filter network
  recorded on its trusted hold-out (``calibration.json`` next to the model, copied into the score
  folder's manifest).
- ``NAME.COL:top=F``: keep the top fraction F of all valid samples by that score (global: ties at the
  cut are all kept, so slightly more than F may survive).
- ``uids:PATH``: keep samples whose uid is in a DataComp uid subset file (see ``curate.uids``).

A score folder must cover the input: a shard without a sidecar, a sidecar written for other bytes
of its shard, or a sidecar that lacks a valid sample's key is refused naming the shard. A sample
whose score is null (its image failed to decode at scoring) fails that criterion. Dropped samples are counted per reason: with ``and`` the first failing criterion, with
``or`` ``none of: ...``; damaged/undecodable samples are ``corrupt``.
"""

from __future__ import annotations

import json
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmforge.curate.io import check_score_folder, read_parquet, shard_stem
from vlmforge.curate.reshard import DecideResult
from vlmforge.curate.truth import filter_metrics
from vlmforge.curate.uids import load_uids, uids_in_subset
from vlmforge.errors import UserError

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_THRESH = re.compile(r"^\s*([A-Za-z0-9_\-]+)(?:\.([A-Za-z0-9_\-]+))?\s*(>=|<=|>|<)\s*(\S+)\s*$")
_TOP = re.compile(r"^\s*([A-Za-z0-9_\-]+)(?:\.([A-Za-z0-9_\-]+))?\s*:\s*top\s*=\s*([0-9.eE+-]+)\s*$")
_UIDS = re.compile(r"^\s*uids\s*:\s*(.+?)\s*$")


@dataclass
class Criterion:
    text: str
    kind: str  # threshold | top | uids
    name: str = ""
    column: str = "score"
    op: str = ">="
    value: float = 0.0
    path: str = ""


def parse_criterion(text: str) -> Criterion:
    m = _UIDS.match(text)
    if m:
        return Criterion(text=text.strip(), kind="uids", path=m.group(1))
    m = _TOP.match(text)
    if m:
        frac = float(m.group(3))
        if not 0.0 < frac <= 1.0:
            raise UserError(f"criterion {text!r}: top fraction must be in (0, 1]")
        return Criterion(text=text.strip(), kind="top", name=m.group(1), column=m.group(2) or "score", value=frac)
    m = _THRESH.match(text)
    if m:
        raw = m.group(4)
        c = Criterion(text=text.strip(), kind="threshold", name=m.group(1), column=m.group(2) or "score", op=m.group(3))
        if raw == "calibrated":
            c.path = "calibrated"
        else:
            try:
                c.value = float(raw)
            except ValueError:
                raise UserError(f"criterion {text!r}: threshold {raw!r} is not a number or 'calibrated'") from None
        return c
    raise UserError(
        f"cannot parse criterion {text!r}; expected NAME[.COL]>=X, NAME[.COL]:top=F or uids:PATH"
    )


def parse_scores_args(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise UserError(f"--scores {it!r}: expected NAME=DIR (a folder written by `vlmforge curate score`)")
        name, d = it.split("=", 1)
        if not os.path.isdir(d):
            raise UserError(f"--scores {it!r}: folder {d} does not exist")
        out[name] = d
    return out


def calibrated_threshold(score_dir: str) -> float:
    path = Path(score_dir) / "manifest.json"
    try:
        cal = json.loads(path.read_text()).get("calibration") or {}
        return float(cal["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{path}: no calibration threshold (score with a filter network trained by `curate train-filter`)"
        ) from None


def load_score_column(score_dir: str, shards: list[str], in_index: np.ndarray, keys: list, column: str,
                      valid: np.ndarray | None = None) -> np.ndarray:
    """Float per row (NaN where the score is null), joined on (shard stem, key). A shard without a
    sidecar, or a valid row (``valid``) whose key the sidecar lacks, is refused naming the shard."""
    values = np.full(len(keys), np.nan, dtype=np.float64)
    rows_by_shard: dict[int, list[int]] = {}
    for r, i in enumerate(in_index):
        rows_by_shard.setdefault(int(i), []).append(r)
    for i, rows in rows_by_shard.items():
        path = Path(score_dir) / f"{shard_stem(shards[i])}.parquet"
        if not path.exists():
            raise UserError(f"{path}: no score sidecar for shard {shards[i]}; score it with `vlmforge curate score`")
        t = read_parquet(path)
        if column not in t.column_names:
            raise UserError(f"{path}: no column {column!r} (has {', '.join(t.column_names)})")
        col = t.column(column).cast("double").to_numpy(zero_copy_only=False)
        lookup = dict(zip(t.column("key").to_pylist(), col))
        uncovered = [keys[r] for r in rows if keys[r] not in lookup and (valid is None or valid[r])]
        if uncovered:
            raise UserError(
                f"{path}: does not cover shard {shards[i]}: {len(uncovered)} of its samples have no score row "
                f"(e.g. key {uncovered[0]!r}); rescore the shard with `vlmforge curate score`"
            )
        for r in rows:
            v = lookup.get(keys[r])
            if v is not None:
                values[r] = v
    return values


def make_decide(criteria: list[Criterion], combine: str, scores: dict[str, str], shards: list[str], truth=None):
    """The global decision function for reshard.run (see reshard.DecideFn)."""
    for c in criteria:
        if c.kind in ("threshold", "top") and c.name not in scores:
            raise UserError(f"criterion {c.text!r} uses scores {c.name!r} but no --scores {c.name}=DIR was given")
    for name in dict.fromkeys(c.name for c in criteria if c.kind in ("threshold", "top")):
        check_score_folder(scores[name], shards, f"--scores {name}={scores[name]}")  # before any work
    for c in criteria:
        if c.kind == "threshold" and c.path == "calibrated":
            c.value = calibrated_threshold(scores[c.name])
        if c.kind == "uids":
            load_uids(c.path)  # fail early on a bad file

    def decide(table, valid: np.ndarray) -> DecideResult:
        n = table.num_rows
        in_index = table.column("in_index").to_numpy()
        keys = table.column("key").to_pylist()
        passes = []
        report: dict = {"thresholds": {}}
        for c in criteria:
            if c.kind == "uids":
                ok = uids_in_subset(table.column("uid").to_pylist(), load_uids(c.path))
            else:
                v = load_score_column(scores[c.name], shards, in_index, keys, c.column, valid=valid)
                if c.kind == "top":
                    pool = v[valid & ~np.isnan(v)]
                    k = int(np.ceil(c.value * valid.sum()))
                    thr = np.inf if k == 0 or len(pool) == 0 else np.sort(pool)[::-1][min(k, len(pool)) - 1]
                    ok = ~np.isnan(v) & (v >= thr)
                    report["thresholds"][c.text] = float(thr)
                else:
                    ok = ~np.isnan(v) & _OPS[c.op](np.nan_to_num(v, nan=-np.inf if c.op in (">", ">=") else np.inf), c.value)
                    report["thresholds"][c.text] = c.value
            passes.append(ok)
        if not criteria:
            keep = np.ones(n, dtype=bool)
            reason = [None] * n
        elif combine == "and":
            keep = np.logical_and.reduce(passes)
            first_fail = np.argmax(~np.stack(passes), axis=0)
            reason = [None if keep[i] else criteria[first_fail[i]].text for i in range(n)]
        else:
            keep = np.logical_or.reduce(passes)
            label = "none of: " + " | ".join(c.text for c in criteria)
            reason = [None if keep[i] else label for i in range(n)]
        if truth is not None:
            report["ground_truth"] = filter_metrics(truth, shards, table, keep & valid, valid)
        return DecideResult(keep=keep, reason=reason, report=report)

    return decide
