"""Small I/O helpers of the curation passes: work split, atomic parquet, resume bookkeeping, uids.

Every per-shard output is written to a temp name and renamed, so its presence means "done";
a restarted run skips those and deletes temp leftovers of the killed one.
"""

from __future__ import annotations

import hashlib
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
from vlmforge.imagedecode import MAX_PIXELS, decode_image, open_image

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


# A score sidecar records the input shard it was computed from (size, mtime, sha256) in its
# parquet metadata under this key, so a rerun rescores and filter refuses a shard changed since.
SHARD_SIGNATURE_KEY = b"vlmforge.shard_signature"


def shard_signature(path: str | os.PathLike) -> dict:
    """size, mtime_ns and sha256 of a shard file."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def sidecar_signature(path: str | os.PathLike) -> Optional[dict]:
    """The shard signature a sidecar recorded (None: written by hand or by an older vlmforge)."""
    raw = (pq.read_schema(str(path)).metadata or {}).get(SHARD_SIGNATURE_KEY)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def shard_changed(shard: str | os.PathLike, recorded: dict) -> bool:
    """Whether the shard's bytes differ from a recorded signature (same size and mtime: unchanged;
    same size, new mtime: decided by the sha256)."""
    st = os.stat(shard)
    if st.st_size != recorded.get("size"):
        return True
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return False
    return shard_signature(shard)["sha256"] != recorded.get("sha256")


def check_score_folder(score_dir: str | os.PathLike, shards: Sequence[str], flag: str) -> None:
    """Refuse a score folder that lacks a sidecar for an input shard, or whose sidecar was written
    for other bytes of that shard (``flag`` names the option in the message)."""
    folder = Path(score_dir)
    if not any(folder.glob("*.parquet")):
        raise UserError(f"{flag}: {folder} holds no score sidecars; score the shards first "
                        f"(`vlmforge curate score --in SHARDS --out {folder}`)")
    for shard in shards:
        path = folder / f"{shard_stem(shard)}.parquet"
        if not path.is_file():
            raise UserError(f"{flag}: no score sidecar for shard {shard} (expected {path}); "
                            f"score it with `vlmforge curate score --in ... --out {folder}`")
        sig = sidecar_signature(path)
        if sig is not None and shard_changed(shard, sig):
            raise UserError(f"{flag}: shard {shard} changed since {path} was written; rerun `vlmforge curate score` "
                            f"into {folder} (it rescores changed shards)")


def write_parquet_atomic(table, path: str | os.PathLike, signature: Optional[dict] = None) -> None:
    """Write a parquet file atomically; ``signature``: the input shard's, kept in the file's metadata."""
    if signature is not None:
        meta = dict(table.schema.metadata or {})
        meta[SHARD_SIGNATURE_KEY] = json.dumps(signature).encode()
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


JPEG_MODES = ("L", "RGB", "CMYK")  # baseline JPEG modes whose RGB conversion is a plain convert()


def decode_scaled(data: bytes | None, min_size: tuple[int, int] | None = None):
    """:func:`vlmforge.imagedecode.decode_image`, except that a JPEG is decoded at the smallest DCT
    scale (1, 1/2, 1/4, 1/8) that keeps both sides >= ``min_size`` (w, h) (PIL's ``Image.draft``):
    other pixels than a full decode, so opt-in. Anything else, or anything that goes wrong (an
    image over the pixel cap too), is left to ``decode_image`` (same errors, same messages)."""
    if min_size is None or not data or data[:3] != b"\xff\xd8\xff":
        return decode_image(data)
    try:
        im = open_image(io.BytesIO(data))
        if im.format != "JPEG" or im.mode not in JPEG_MODES or im.width * im.height > MAX_PIXELS:
            return decode_image(data)  # over the cap: decode_image refuses it with its message
        im.draft("RGB", (int(min_size[0]), int(min_size[1])))
        im.load()
    except Exception:  # PIL raises many types for bad data; decode_image turns them into ImageDecodeError
        return decode_image(data)
    return im.convert("RGB") if im.mode != "RGB" else im


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
