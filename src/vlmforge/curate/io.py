"""Small I/O helpers of the curation passes: work split, atomic parquet, resume bookkeeping, uids.

Every per-shard output is written to a temp name and renamed, so its presence means "done";
a restarted run skips those and deletes temp leftovers of the killed one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import pyarrow.parquet as pq
import torch.utils.data as tud
from tqdm.auto import tqdm

from vlmforge import dist
from vlmforge.errors import UserError
from vlmforge.files import atomic_write_bytes, write_json

TMP_MARK = ".tmp"


def my_items(items: Sequence, rank: int | None = None, world: int | None = None) -> list:
    """This rank's share (round-robin) of a list of shards / output shards."""
    r = dist.rank() if rank is None else rank
    w = dist.world_size() if world is None else world
    return list(items[r::w])


def worker_items(items: Sequence) -> list:
    """This DataLoader worker's share of this rank's items (all of them outside a worker)."""
    info = tud.get_worker_info()
    if info is None:
        return list(items)
    return list(items[info.id :: info.num_workers])


def shard_stem(path: str | os.PathLike) -> str:
    name = os.path.basename(str(path))
    return name[: -len(".tar")] if name.endswith(".tar") else name


def as_iterable_dataset(obj: Iterable) -> tud.IterableDataset:
    """A DataLoader-ready IterableDataset over ``obj`` (whose ``__iter__`` splits work over workers)."""

    class _It(tud.IterableDataset):
        def __iter__(self):
            return iter(obj)

    return _It()


def sample_uid(meta: dict) -> Optional[str]:
    """The DataComp uid in a sample's metadata, as a string (None when absent)."""
    uid = meta.get("uid") if isinstance(meta, dict) else None
    return None if uid is None else str(uid)


def write_parquet_atomic(table, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_parquet(path: str | os.PathLike):
    return pq.read_table(str(path))


def remove_temp_leftovers(folder: str | os.PathLike) -> int:
    """Delete the temp files a killed run left (``.name.tmpPID``); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.rglob(".*"):
        if p.is_file() and TMP_MARK in p.name:
            p.unlink(missing_ok=True)
            n += 1
    return n


def check_same_inputs(work_dir: Path, inputs: list, what: str) -> None:
    """A resumed run must see the same inputs as the killed one; refuse to mix two runs in one folder."""
    path = work_dir / "inputs.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != inputs:
            raise UserError(
                f"{path}: this output folder holds a {what} run with different inputs/settings; "
                "use a new --out folder (or delete this one)"
            )
    else:
        write_json(path, inputs)


def progress(it: Iterable, total: int | None = None, desc: str = "") -> Iterator:
    """tqdm on the main rank only, silent elsewhere."""
    if not dist.is_main():
        return iter(it)
    return iter(tqdm(it, total=total, desc=desc, dynamic_ncols=True, mininterval=1.0))
