"""DataComp uid subset files: a sorted numpy array of 128-bit uids, two uint64 each.

The format DataComp's ``resharder.py`` reads (and the released subsets, e.g. DFN's top 15%,
ship in): dtype ``np.dtype("u8,u8")`` (fields f0 = high 64 bits, f1 = low 64 bits of the
32-hex-digit uid), sorted, as a ``.npy`` file or a raw memmap of those 16-byte records.
Membership is two ``searchsorted`` calls, so a 100M-uid subset costs 1.6 GB mapped, not loaded.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import numpy as np

from vlmforge.errors import UserError
from vlmforge.files import atomic_write_bytes

U16 = np.dtype("u8,u8")


def uid_to_pair(uid: str) -> tuple[int, int]:
    """'0123...ef' (32 hex digits, DataComp uid) -> (high64, low64)."""
    return divmod(int(uid, 16), 2**64)


def uids_to_array(uids: Iterable[str]) -> np.ndarray:
    """Hex uids -> sorted structured array in DataComp's format (duplicates kept, like theirs)."""
    arr = np.array([uid_to_pair(u) for u in uids], dtype=U16)
    arr.sort(order=["f0", "f1"])
    return arr


def save_uids(uids: Iterable[str], path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    np.save(buf, uids_to_array(uids), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_uids(path: str | os.PathLike) -> np.ndarray:
    """A ``.npy`` (memory-mapped) or raw record file; checks dtype and sortedness."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"uid subset file not found: {path}")
    with open(path, "rb") as f:
        is_npy = f.read(6) == b"\x93NUMPY"
    if is_npy:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        if os.path.getsize(path) % U16.itemsize:
            raise UserError(f"{path}: not a .npy file and its size is not a multiple of 16 bytes (u8,u8 records)")
        arr = np.memmap(path, U16, mode="r")
    if arr.dtype != U16:
        raise UserError(f"{path}: uid subset dtype must be {U16} (two uint64 per uid), got {arr.dtype}")
    if arr.ndim != 1:
        raise UserError(f"{path}: uid subset must be 1-D, got shape {arr.shape}")
    if len(arr) > 1:
        a, b = np.asarray(arr["f0"]), np.asarray(arr["f1"])
        bad = (a[1:] < a[:-1]) | ((a[1:] == a[:-1]) & (b[1:] < b[:-1]))
        if bad.any():
            raise UserError(f"{path}: uid subset is not sorted (first unsorted record #{int(np.argmax(bad)) + 1})")
    return arr


def uids_in_subset(uids: list, subset: np.ndarray) -> np.ndarray:
    """Bool per uid (hex string or None): is it in the sorted subset? None / bad hex -> False."""
    out = np.zeros(len(uids), dtype=bool)
    idx, pairs = [], []
    for i, u in enumerate(uids):
        if u is None:
            continue
        try:
            pairs.append(uid_to_pair(u))
            idx.append(i)
        except ValueError:
            continue
    if not pairs or len(subset) == 0:
        return out
    q = np.array(pairs, dtype=U16)
    pos = np.searchsorted(subset, q, side="left")
    found = pos < len(subset)
    hit = np.zeros(len(q), dtype=bool)
    hit[found] = subset[pos[found]] == q[found]
    out[np.array(idx)] = hit
    return out
