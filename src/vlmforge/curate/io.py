"""Small I/O helpers of the curation passes: work split, atomic parquet, resume bookkeeping.

Every per-shard output is written to a temp name and renamed, so its presence means "done";
a restarted run skips those and deletes temp leftovers of the killed one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

TMP_MARK = ".tmp"


def my_items(items: Sequence, rank: int | None = None, world: int | None = None) -> list:
    """This rank's share (round-robin) of a list of shards / output shards."""
    from vlmforge import dist

    r = dist.rank() if rank is None else rank
    w = dist.world_size() if world is None else world
    return list(items[r::w])


def worker_items(items: Sequence) -> list:
    """This DataLoader worker's share of this rank's items (all of them outside a worker)."""
    import torch.utils.data as tud

    info = tud.get_worker_info()
    if info is None:
        return list(items)
    return list(items[info.id :: info.num_workers])


def shard_stem(path: str | os.PathLike) -> str:
    name = os.path.basename(str(path))
    return name[: -len(".tar")] if name.endswith(".tar") else name


def write_parquet_atomic(table, path: str | os.PathLike) -> None:
    import pyarrow.parquet as pq

    from vlmforge.files import atomic_write_bytes

    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_parquet(path: str | os.PathLike):
    import pyarrow.parquet as pq

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
    from vlmforge.errors import UserError
    from vlmforge.files import write_json

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
    from vlmforge import dist

    if not dist.is_main():
        return iter(it)
    from tqdm.auto import tqdm

    return iter(tqdm(it, total=total, desc=desc, dynamic_ncols=True, mininterval=1.0))
