"""``curate score``: one score sidecar per input shard, ``OUT/<shard stem>.parquet``.

Columns: ``key``, ``uid``, ``score`` (float, null where the sample is damaged or its image does not
decode), ``error`` (why), plus scorer-specific columns. Shards are split over torchrun ranks
(round-robin) and each rank's over DataLoader workers, which read, decode and preprocess whole
shards; the main process runs the model and writes a shard's sidecar atomically when its last
batch arrives, with the shard's size, mtime and sha256 in its metadata. On CPU the model's
intra-op threads leave the readers their cores (``model_threads``). A restarted run skips
shards whose sidecar exists and rescores a shard whose bytes changed since its sidecar was written.

A worker hands a batch's ``pixel_values`` tensor to the main process through shared-memory buffers
it reuses (:class:`vlmforge.data.pixels.PixelSlots`, the tensor's bytes as they are: the
values are the ones a batch prepared in the main process has); a fresh segment per batch costs the
main process a page fault per page. The buffer is free again once ``scorer.score`` returns, so a
scorer must not keep the batch's tensors. A scorer with a ``decode_size`` (w, h) gets JPEGs decoded
at a reduced scale (:func:`vlmforge.curate.io.decode_scaled`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.utils.data as tud

from vlmforge import dist
from vlmforge.config.recipe import Recipe
from vlmforge.curate.io import (
    as_iterable_dataset,
    check_same_inputs,
    decode_scaled,
    my_items,
    progress,
    read_parquet,
    remove_temp_leftovers,
    sample_uid,
    shard_changed,
    shard_signature,
    shard_stem,
    sidecar_signature,
    worker_items,
    write_parquet_atomic,
)
from vlmforge.data.pixels import PixelSlots
from vlmforge.errors import UserError
from vlmforge.files import write_manifest
from vlmforge.imagedecode import ImageDecodeError
from vlmforge.shards import iter_raw_samples

PREFETCH = 2  # batches each reader worker prepares ahead (torch's default)


class _ScoreBatches:
    """Yields prepared batches per shard: dict(index, keys, uids, batch|None, errors, last)."""

    def __init__(self, todo: list, scorer, batch_size: int):
        self.todo, self.scorer, self.batch_size = todo, scorer, batch_size

    def __iter__(self):
        decode_size = getattr(self.scorer, "decode_size", None)
        for index, path in worker_items(self.todo):
            sig = shard_signature(path)  # before reading: a shard rewritten during scoring is rescored next run
            pos, keys, uids, images, captions, errors = [], [], [], [], [], []
            for p, s in enumerate(iter_raw_samples(path)):
                err, image = s.error, None
                if err is None:
                    try:
                        image = decode_scaled(s.image_bytes, decode_size)
                    except ImageDecodeError as e:
                        err = f"image: {e}"
                if err is not None:
                    errors.append((p, s.key, sample_uid(s.meta), err))
                    continue
                pos.append(p)
                keys.append(s.key)
                uids.append(sample_uid(s.meta))
                images.append(image)
                captions.append(s.caption or "")
                if len(keys) == self.batch_size:
                    yield self._item(index, pos, keys, uids, images, captions, errors, last=False)
                    pos, keys, uids, images, captions, errors = [], [], [], [], [], []
            yield self._item(index, pos, keys, uids, images, captions, errors, last=True, sig=sig)

    def _item(self, index, pos, keys, uids, images, captions, errors, last, sig=None):
        batch = self.scorer.prepare(images, captions) if keys else None
        return {"index": index, "pos": pos, "keys": keys, "uids": uids, "batch": batch, "errors": errors,
                "last": last, "signature": sig}


class _ToMain:
    """A reader worker's last step on an item: DataLoader's own conversion (numpy -> tensors, what
    the main process gets without workers too), then the batch's tensors packed by :func:`send_batch`."""

    def __init__(self, slots: PixelSlots):
        self.slots = slots

    def __call__(self, item: dict) -> dict:
        item = tud.default_convert(item)
        if item["batch"] is not None:
            item["batch"] = send_batch(item["batch"], self.slots)
        return item


def send_batch(batch: dict, slots: PixelSlots) -> dict:
    """In a reader worker: the batch's ``pixel_values`` bytes in one of the worker's shared buffers
    (``pixel_slot``: which; ``pixel_dtype``: the tensor's dtype), its other tensors as numpy arrays
    (``numpy_tensors``: which; pickled through the pipe: a shared segment per small tensor costs more
    than its bytes), anything else as it is."""
    out: dict = {"numpy_tensors": []}
    for key, value in batch.items():
        if key == "pixel_values" and isinstance(value, torch.Tensor) and value.numel():
            value = value.contiguous()
            raw = value.view(torch.uint8) if value.dtype != torch.uint8 else value
            out[key], out["pixel_slot"] = slots.put(raw)
            out["pixel_dtype"] = value.dtype
        elif isinstance(value, torch.Tensor):
            out[key] = value.numpy()
            out["numpy_tensors"].append(key)
        else:
            out[key] = value
    return out


def receive_batch(batch: dict) -> tuple[dict, int]:
    """In the main process: what :func:`send_batch` sent as the scorer's batch (tensors back, the
    pixels viewed as their dtype in the shared buffer), and the buffer to release after scoring."""
    batch = dict(batch)
    slot, dtype = int(batch.pop("pixel_slot", -1)), batch.pop("pixel_dtype", None)
    tensors = set(batch.pop("numpy_tensors", ()))
    out = {k: torch.from_numpy(v) if k in tensors else v for k, v in batch.items()}
    if dtype is not None and dtype != torch.uint8:
        out["pixel_values"] = out["pixel_values"].view(dtype)
    return out, slot


def _sidecar_table(rows: list[dict]):
    """Rows (in input order) -> table with the fixed core columns first."""
    rows = sorted(rows, key=lambda r: r["_pos"])
    cols = {
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "uid": pa.array([r["uid"] for r in rows], pa.string()),
        "score": pa.array([r["score"] for r in rows], pa.float32()),
        "error": pa.array([r["error"] for r in rows], pa.string()),
    }
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in cols and k != "_pos"]
    for name in extra:
        cols[name] = pa.array([r.get(name) for r in rows])
    return pa.table(cols)


def _sidecar_state(sidecar: Path, shard: str) -> str:
    """missing | stale (the shard's bytes changed since, or no signature recorded) | current."""
    if not sidecar.exists():
        return "missing"
    sig = sidecar_signature(sidecar)
    return "stale" if sig is None or shard_changed(shard, sig) else "current"


def _py(v):
    return v.item() if isinstance(v, np.generic) else v


@contextlib.contextmanager
def model_threads(device: torch.device, workers: int):
    """The model's intra-op threads on CPU while ``workers`` reader processes run: the cores they
    leave, at least one. Intra-op threads that share cores with busy readers wait on each other at
    every parallel op; the readers get one thread each from DataLoader already."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, min(before, cores - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score_items(loader, scorer, out: Path, stems: list[str], bar, slots: PixelSlots | None = None) -> int:
    """Score the prepared batches as they come; write each shard's sidecar at its last batch.
    Returns the samples scored."""
    pending: dict[int, list] = {}
    n_scored = 0
    for item in loader:
        i = item["index"]
        rows = pending.setdefault(i, [])
        for p, k, u, e in item["errors"]:
            rows.append({"_pos": p, "key": k, "uid": u, "score": None, "error": e})
        if item["batch"] is not None:
            if slots is None:
                cols = scorer.score(item["batch"])
            else:
                batch, slot = receive_batch(item["batch"])
                cols = scorer.score(batch)
                slots.release(slot, batch.get("pixel_values"))
            n_scored += len(item["keys"])
            for j, (p, k, u) in enumerate(zip(item["pos"], item["keys"], item["uids"])):
                row = {"_pos": p, "key": k, "uid": u, "error": None}
                for col, vals in cols.items():
                    v = _py(vals[j])
                    row[col] = None if isinstance(v, float) and np.isnan(v) else v
                rows.append(row)
        if item["last"]:
            write_parquet_atomic(_sidecar_table(pending.pop(i)), out / f"{stems[i]}.parquet",
                                 signature=item["signature"])
            next(bar, None)
    return n_scored


def score_shards(shards: list[str], out_dir, scorer, batch_size: int = 64, num_workers: int = 0,
                 config: Recipe | None = None, settings: dict | None = None) -> dict:
    out = Path(out_dir)
    stems = [shard_stem(p) for p in shards]
    if len(set(stems)) != len(stems):
        raise UserError("input shards from different folders share file names; score each folder separately")
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        remove_temp_leftovers(out)
        check_same_inputs(out, {"shards": shards, "scorer": scorer.info(), "settings": settings or {}}, "score")
    dist.barrier()

    todo, changed = [], []
    for i, p in my_items(list(enumerate(shards))):
        state = _sidecar_state(out / f"{stems[i]}.parquet", p)
        if state != "current":
            todo.append((i, p))
        if state == "stale":
            changed.append(p)
    if changed:
        print(f"curate score: {len(changed)} shard(s) changed since they were scored (or predate recorded signatures), rescoring: "
              + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""), flush=True)
    t0, n_scored = time.time(), 0
    workers = min(num_workers, len(todo))
    if todo:
        ds = as_iterable_dataset(_ScoreBatches(todo, scorer, batch_size))
        if workers:
            slots = PixelSlots(workers, PREFETCH + 2)
            loader = tud.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=PREFETCH,
                                    collate_fn=_ToMain(slots))
        else:
            slots, loader = None, tud.DataLoader(ds, batch_size=None)
        bar = progress(range(len(todo)), total=len(todo), desc=f"score ({scorer.info()['scorer']})")
        with model_threads(torch.device(getattr(scorer, "device", "cpu")), workers):
            n_scored = _score_items(loader, scorer, out, stems, bar, slots)
        for _ in bar:
            pass
    elapsed = time.time() - t0
    dist.barrier()

    manifest: dict = {}
    if dist.is_main():
        n_in = n_ok = unparseable = 0
        errors: dict[str, int] = {}
        per_shard = {}
        for i, p in enumerate(shards):
            t = read_parquet(out / f"{stems[i]}.parquet")
            errs = t.column("error").to_pylist()
            sc = t.column("score").to_pylist()
            ok = sum(1 for e, s in zip(errs, sc) if e is None and s is not None)
            n_in += t.num_rows
            n_ok += ok
            for e in errs:
                if e is not None:
                    errors["corrupt"] = errors.get("corrupt", 0) + 1
            if "unparseable" in t.column_names:  # mlm judge: answers that held no score (still scored by EV)
                unparseable += sum(1 for u in t.column("unparseable").to_pylist() if u)
            per_shard[p] = {"rows": t.num_rows, "scored": ok, "sidecar": f"{stems[i]}.parquet"}
        extra = {"scorer": scorer.info(), "per_shard": per_shard,
                 "throughput_this_rank0_run": {"samples": n_scored, "seconds": elapsed}}
        cal = Path(str(getattr(scorer, "model_path", ""))) / "calibration.json"
        if cal.is_file():
            extra["calibration"] = json.loads(cal.read_text())
        counts = {"in": n_in, "scored": n_ok, "not_scored": n_in - n_ok,
                  "reconciled": n_ok + sum(errors.values()) == n_in}
        if unparseable:
            counts["judge_answers_unparseable"] = unparseable
        write_manifest(out, "curate.score", inputs=shards, config=config, counts=counts, dropped=errors, **extra)
        manifest = json.loads((out / "manifest.json").read_text())
    dist.barrier()
    return manifest
