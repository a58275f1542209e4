"""The engine behind ``curate filter | dedup | mix``: inspect -> decide -> plan -> write.

1. inspect (per input shard, split over ranks and workers, resumable): read the tar, check every
   sample (damaged member, undecodable image -> ``error``), and record what the decision needs
   (hashes, ...) in ``_work/inspect/<index>.parquet``.
2. decide (rank 0, global view): a command-specific function sees all inspect rows at once and
   returns keep/reason per sample (and optionally an output order, e.g. a mix's interleaving).
   Kept samples get consecutive output positions; output shard = position // samples_per_shard.
   Written once to ``_work/plan.parquet``.
3. write (per output shard, split over ranks, resumable): each output shard reads only the input
   shards that feed it and writes ``NNNNN.tar/.parquet/_stats.json`` with ``ShardWriter``
   (tar renamed into place last, so a present tar means a finished shard).
4. manifest (rank 0 after a barrier): counts that reconcile (in = kept + dropped per reason),
   the criteria, and lineage (which input shards fed each output shard).

A killed run restarted with the same arguments redoes only what has no finished file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import torch.utils.data as tud

from vlmforge import dist
from vlmforge.curate.io import (
    as_iterable_dataset,
    check_same_inputs,
    my_items,
    progress,
    read_parquet,
    remove_temp_leftovers,
    sample_uid,
    worker_items,
    write_parquet_atomic,
)
from vlmforge.files import note_example, write_json, write_manifest
from vlmforge.imagedecode import ImageDecodeError, ImageTooLargeError, decode_image
from vlmforge.shards import ShardWriter, iter_raw_samples, list_shards, shard_shortfall

CORRUPT = "corrupt"
TOO_LARGE = ImageTooLargeError.reason  # an image over the pixel cap: its own reason, not corrupt

# (sample, decoded PIL image or None) -> extra columns for that sample.
ExtraFn = Callable[[Any, Any], dict]


@dataclass
class DecideResult:
    keep: np.ndarray  # bool per row
    reason: list  # str per dropped row (None where kept)
    order: Optional[np.ndarray] = None  # sort key for kept rows (default: input order)
    report: dict = field(default_factory=dict)  # extra manifest entries (what was found, metrics)


# Rows with ``error`` set are dropped as corrupt before ``decide`` is called; it receives the
# full table and a boolean mask of the valid rows and decides only for those.
DecideFn = Callable[[Any, np.ndarray], DecideResult]


@dataclass
class Job:
    stage: str  # manifest stage name, e.g. "curate.filter"
    shards: list  # input tar paths (global order)
    out_dir: Path
    decide: DecideFn
    samples_per_shard: int = 1000
    sources: Optional[list] = None  # source name per input shard (mix)
    extra: Optional[ExtraFn] = None
    decode: bool = True  # decode every image during inspect (corrupt check, and what extra needs)
    num_workers: int = 0
    settings: dict = field(default_factory=dict)  # criteria etc.: recorded and checked on resume
    config: Any = None


# -- 1. inspect -----------------------------------------------------------------------------
def inspect_shard(path: str, index: int, decode: bool, extra: Optional[ExtraFn]):
    """One row per sample of the tar: index, pos, key, origin_key, uid, error (+ extra columns).
    ``origin_key`` is the sample's key in the first shards of a curation chain (ground truth is keyed by it)."""
    rows: list[dict] = []
    for pos, s in enumerate(iter_raw_samples(path)):
        err = s.error
        image = None
        if err is None and decode:
            try:
                image = decode_image(s.image_bytes)
            except ImageTooLargeError as e:
                err = f"{TOO_LARGE}: {e}"
            except ImageDecodeError as e:
                err = f"image: {e}"
        origin = s.meta.get("origin_key") if isinstance(s.meta, dict) else None
        row = {"in_index": index, "pos": pos, "key": s.key, "origin_key": origin or s.key, "uid": sample_uid(s.meta), "error": err}
        if extra is not None and err is None:
            row.update(extra(s, image))
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["in_index", "pos", "key", "origin_key", "uid", "error"]
    table = pa.table({c: [r.get(c) for r in rows] for c in cols})
    # Fixed types for the core columns (an all-null column would otherwise have type null).
    for c, t in (("in_index", pa.int64()), ("pos", pa.int64()), ("key", pa.string()),
                 ("origin_key", pa.string()), ("uid", pa.string()), ("error", pa.string())):
        table = table.set_column(table.schema.get_field_index(c), c, table.column(c).cast(t))
    return table


class _InspectDataset:
    """IterableDataset over this rank's unfinished shards; each worker inspects whole shards."""

    def __init__(self, todo: list, inspect_dir: Path, decode: bool, extra: Optional[ExtraFn]):
        self.todo, self.inspect_dir, self.decode, self.extra = todo, inspect_dir, decode, extra

    def __iter__(self):
        for index, path in worker_items(self.todo):
            table = inspect_shard(path, index, self.decode, self.extra)
            write_parquet_atomic(table, self.inspect_dir / f"{index:06d}.parquet")
            yield index


def run_inspect(job: Job, work: Path) -> None:
    inspect_dir = work / "inspect"
    inspect_dir.mkdir(parents=True, exist_ok=True)
    mine = my_items(list(enumerate(job.shards)))
    todo = [(i, p) for i, p in mine if not (inspect_dir / f"{i:06d}.parquet").exists()]
    if not todo:
        return
    ds = as_iterable_dataset(_InspectDataset(todo, inspect_dir, job.decode, job.extra))
    loader = tud.DataLoader(ds, batch_size=None, num_workers=min(job.num_workers, len(todo)))
    for _ in progress(loader, total=len(todo), desc=f"{job.stage}: inspect"):
        pass


# -- 2. decide + plan -----------------------------------------------------------------------
def load_inspected(work: Path, n_shards: int):
    tables = [read_parquet(work / "inspect" / f"{i:06d}.parquet") for i in range(n_shards)]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def build_plan(job: Job, work: Path) -> dict:
    """Global decision (rank 0): writes plan.parquet (kept rows with out_shard) and decisions.json."""
    table = load_inspected(work, len(job.shards))
    n = table.num_rows
    errors = table.column("error").to_pylist()
    valid = np.array([e is None for e in errors], dtype=bool)
    res = job.decide(table, valid)
    keep = np.asarray(res.keep, dtype=bool) & valid
    reasons = [(TOO_LARGE if errors[i].startswith(TOO_LARGE + ":") else CORRUPT) if not valid[i]
               else (None if keep[i] else (res.reason[i] or "dropped")) for i in range(n)]

    kept_idx = np.nonzero(keep)[0]
    if res.order is not None:
        kept_idx = kept_idx[np.argsort(np.asarray(res.order)[kept_idx], kind="stable")]
    out_pos = np.arange(len(kept_idx))
    plan = pa.table(
        {
            "out_shard": (out_pos // job.samples_per_shard).astype(np.int64),
            "in_index": table.column("in_index").to_numpy()[kept_idx],
            "pos": table.column("pos").to_numpy()[kept_idx],
        }
    )
    write_parquet_atomic(plan, work / "plan.parquet")
    dropped = Counter(r for r in reasons if r is not None)
    corrupt_examples = [
        {"shard": job.shards[int(i)], "key": k, "error": e}
        for i, k, e in zip(table.column("in_index").to_pylist(), table.column("key").to_pylist(), errors)
        if e is not None
    ][:20]
    in_index, keys = table.column("in_index").to_pylist(), table.column("key").to_pylist()
    examples: dict[str, list[dict]] = {}  # every reason: its first few samples, with shard and key
    for i, r in enumerate(reasons):
        if r is not None:
            note_example(examples, r, {"shard": job.shards[int(in_index[i])], "key": keys[i], "error": errors[i]})
    read = Counter(int(i) for i, k in zip(in_index, keys) if k)  # keyless rows: a tar cut before any member
    missing = [m for j, path in enumerate(job.shards) if (m := shard_shortfall(path, read.get(j, 0))) is not None]
    decisions = {
        "in": n,
        "kept": int(keep.sum()),
        "dropped": dict(sorted(dropped.items())),
        "corrupt_examples": corrupt_examples,
        "dropped_examples": examples,
        "missing_samples": missing,
        "report": res.report,
    }
    if job.sources is not None:
        src = np.array(job.sources, dtype=object)[table.column("in_index").to_numpy()]
        decisions["per_source"] = {
            s: {"in": int((src == s).sum()), "kept": int((keep & (src == s)).sum())} for s in dict.fromkeys(job.sources)
        }
    write_json(work / "decisions.json", decisions)
    return decisions


# -- 3. write -------------------------------------------------------------------------------
def write_output_shard(job: Job, j: int, rows: dict) -> dict:
    """Write output shard j from plan rows {in_index: [...], pos: [...]} (in output order)."""
    in_idx, pos = rows["in_index"], rows["pos"]
    wanted: dict[int, set] = {}
    for i, p in zip(in_idx, pos):
        wanted.setdefault(int(i), set()).add(int(p))
    got: dict[tuple, Any] = {}
    for i in sorted(wanted):
        need, remaining = wanted[i], len(wanted[i])
        for p, s in enumerate(iter_raw_samples(job.shards[i])):
            if p in need:
                got[(i, p)] = s
                remaining -= 1
                if remaining == 0:
                    break
    writer = ShardWriter(job.out_dir, samples_per_shard=job.samples_per_shard, start_index=j)
    try:
        for i, p in zip(in_idx, pos):
            s = got.get((int(i), int(p)))
            if s is None:  # the input changed since inspect: refuse rather than silently lose a sample
                raise RuntimeError(f"{job.shards[int(i)]}: sample #{p} vanished since the inspect pass")
            meta = {k: v for k, v in s.meta.items() if k not in ("key", "caption", "sha256")}
            meta["source_key"] = s.key
            meta.setdefault("origin_key", s.key)  # copied from the input's meta along a chain of stages
            meta["source_shard"] = job.shards[int(i)]
            if job.sources is not None:
                meta["source"] = job.sources[int(i)]
            writer.write(writer.next_key(), s.image_bytes, s.caption, meta)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return {"count": len(in_idx), "inputs": [job.shards[i] for i in sorted(wanted)]}


def _plan_groups(plan) -> dict[int, dict]:
    out = plan.column("out_shard").to_numpy()
    in_idx = plan.column("in_index").to_numpy()
    pos = plan.column("pos").to_numpy()
    groups: dict[int, dict] = {}
    for j in np.unique(out):
        m = out == j
        groups[int(j)] = {"in_index": in_idx[m].tolist(), "pos": pos[m].tolist()}
    return groups


def run(job: Job) -> dict:
    """Run the four steps (each skipped where a finished file exists); returns the manifest dict."""
    out = Path(job.out_dir)
    work = out / "_work"
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        remove_temp_leftovers(out)
        check_same_inputs(
            work,
            {"stage": job.stage, "shards": [str(s) for s in job.shards], "sources": job.sources,
             "samples_per_shard": job.samples_per_shard, "settings": job.settings},
            job.stage,
        )
    dist.barrier()

    run_inspect(job, work)
    dist.barrier()
    if dist.is_main() and not (work / "plan.parquet").exists():
        build_plan(job, work)
    dist.barrier()

    groups = _plan_groups(read_parquet(work / "plan.parquet"))
    names = sorted(groups)
    todo = [j for j in my_items(names) if not (out / f"{j:05d}.tar").exists()]
    for j in progress(todo, total=len(todo), desc=f"{job.stage}: write"):
        write_output_shard(job, j, groups[j])
    dist.barrier()

    manifest: dict = {}
    if dist.is_main():
        decisions = json.loads((work / "decisions.json").read_text())
        lineage = {}
        for j in names:
            g = groups[j]
            c = Counter(g["in_index"])
            lineage[f"{j:05d}.tar"] = {
                "count": len(g["in_index"]),
                "inputs": {job.shards[i]: n for i, n in sorted(c.items())},
            }
        n_dropped = sum(decisions["dropped"].values())
        missing = decisions.get("missing_samples", [])
        n_missing = sum(m["missing"] for m in missing)
        counts = {
            "in": decisions["in"],
            "kept": decisions["kept"],
            "dropped": n_dropped,
            "output_shards": len(names),
            # a tar holding fewer samples than its _stats.json counts is not reconciled: they are lost
            "missing_samples": n_missing,
            "reconciled": decisions["in"] == decisions["kept"] + n_dropped
            and sum(v["count"] for v in lineage.values()) == decisions["kept"] and n_missing == 0,
        }
        extra = {"criteria": job.settings, "samples_per_shard": job.samples_per_shard, "lineage": lineage,
                 "corrupt_examples": decisions["corrupt_examples"],
                 "dropped_examples": decisions.get("dropped_examples", {}), "missing_samples": missing,
                 **decisions.get("report", {})}
        if "per_source" in decisions:
            extra["per_source"] = decisions["per_source"]
        write_manifest(out, job.stage, inputs=[str(s) for s in job.shards], config=job.config,
                       counts=counts, dropped=decisions["dropped"], **extra)
        manifest = json.loads((out / "manifest.json").read_text())
    dist.barrier()
    return manifest


def shards_of(paths) -> list[str]:
    return [os.path.abspath(p) for p in list_shards(paths)]
