"""InternVL meta files: a mixture of named data sources, read by ``vlmforge sft-index`` and
``vlmforge preference index``.

``{name: {"root": IMAGES, "annotation": FILE, "repeat_time": r, "data_augment": bool,
"max_dynamic_patch": n}}``: each entry is one annotation file (jsonl; for SFT also a LLaVA JSON
array) whose image paths are relative to its ``root`` (default: the annotation's folder). Paths in
the file are taken as given when they exist (relative to the working folder, as InternVL reads
them), else relative to the meta file's folder. ``repeat_time`` (default 1): below 1 the first
``int(rows * r)`` rows of the file are read (InternVL's subsample, taken before its shuffle);
above 1 the kept rows come ``floor(r)`` times, then the first ``int(kept * fraction)`` once more.
``data_augment`` (default false): random JPEG quality on this source's images in SFT training.
``max_dynamic_patch``: the most tiles per image for this source (recorded for the tiling). Other
keys (InternVL's ``length``, ...) are ignored.

A file is a meta file by content: one JSON object whose values are objects (a LLaVA or MMPR row
has string and list values). A bad meta file or entry is a :class:`UserError` naming the file and
the entry's key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmforge.errors import UserError

MAX_META_BYTES = 64 << 20  # a meta file lists sources; anything larger is data


@dataclass
class SourceFile:
    """One file of rows to index, with the folder its image paths are relative to."""

    path: str
    image_root: str | None
    repeat_time: float = 1.0
    name: str | None = None  # the meta file's entry
    meta_file: str | None = None  # the meta file it came from
    # random JPEG quality in SFT training; None: not set by a meta file (sft.jpeg_augment decides)
    data_augment: bool | None = None
    max_dynamic_patch: int | None = None

    def describe(self) -> dict:
        return {"path": self.path, "image_root": self.image_root, "repeat_time": self.repeat_time,
                "name": self.name, "meta_file": self.meta_file}


def rows_read(rows: int, repeat_time: float) -> int:
    """Rows of a file that are read: the first ``int(rows * repeat_time)`` when ``repeat_time`` < 1
    (InternVL's subsample, taken before its shuffle), else all of them."""
    return int(rows * repeat_time) if repeat_time < 1 else rows


def repeated(kept: np.ndarray, repeat_time: float) -> np.ndarray:
    """The kept rows' positions as often as ``repeat_time`` >= 1 says: ``floor(r)`` copies, then the
    first ``int(len(kept) * fraction)`` once more; unchanged for ``repeat_time`` <= 1."""
    if repeat_time <= 1:
        return kept
    copies = int(math.floor(repeat_time))
    extra = int(kept.size * (repeat_time - copies))
    return np.concatenate([np.tile(kept, copies), kept[:extra]])


def read_meta(path: str | os.PathLike) -> dict | None:
    """The parsed meta file if ``path`` is one, else None (a file of rows).

    A JSON object that does not parse is a meta file only when it is written over several lines
    (its first line is a lone ``{``; a jsonl row never is): that is a UserError naming the place.
    """
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"{") or os.path.getsize(path) > MAX_META_BYTES:
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:
            obj = json.load(f)
    except ValueError as e:
        if head.split(b"\n", 1)[0].strip() == b"{":
            where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise UserError(f"{path}: meta file is not valid JSON{where}: {msg}") from None
        return None  # a jsonl file: one object per line does not parse as one JSON value
    if not isinstance(obj, dict):
        return None
    entries = list(obj.values())
    if any(isinstance(v, dict) and "annotation" in v for v in entries) or (entries and all(isinstance(v, dict)
                                                                                          for v in entries)):
        return obj
    if not obj and head.split(b"\n", 1)[0].strip() == b"{":
        raise UserError(f"{path}: meta file lists no sources (an object of named entries with 'annotation')")
    return None


def near(path: str, base: Path) -> str:
    """``path`` as given (relative to the working folder, as InternVL reads it), else relative to ``base``."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return str(base / path)


def meta_sources(meta_path: str, meta: dict) -> list[SourceFile]:
    """The annotation files of a meta file, each with its root, repeat_time, data_augment and
    max_dynamic_patch; UserError ``META: entry 'NAME': ...`` for a bad entry."""
    base = Path(meta_path).resolve().parent
    if not meta:
        raise UserError(f"{meta_path}: meta file lists no sources")
    out = []
    for name, entry in meta.items():
        where = f"{meta_path}: entry {name!r}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: must be an object with 'annotation' (and 'root', 'repeat_time', ...), "
                            f"got {type(entry).__name__}")
        ann = entry.get("annotation")
        if not isinstance(ann, str) or not ann:
            raise UserError(f"{where}: 'annotation' must be the path of a jsonl file")
        ann = near(ann, base)
        if not os.path.isfile(ann):
            raise UserError(f"{where}: annotation {entry['annotation']} is not a file")
        root = entry.get("root")
        if root is not None and not isinstance(root, str):
            raise UserError(f"{where}: 'root' must be a folder path")
        root = near(root, base) if root else str(Path(ann).resolve().parent)
        if not os.path.isdir(root):
            raise UserError(f"{where}: root {entry.get('root')} is not a folder (the folder its image paths are relative to)")
        rt = entry.get("repeat_time", 1)
        if isinstance(rt, bool) or not isinstance(rt, (int, float)) or not math.isfinite(rt) or rt <= 0:
            raise UserError(f"{where}: repeat_time must be a number > 0, got {rt!r}")
        aug = entry.get("data_augment", False)
        if not isinstance(aug, bool):
            raise UserError(f"{where}: data_augment must be true or false, got {aug!r}")
        tiles = entry.get("max_dynamic_patch")
        if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1):
            raise UserError(f"{where}: max_dynamic_patch must be an integer >= 1, got {tiles!r}")
        out.append(SourceFile(str(Path(ann).resolve()), str(Path(root).resolve()), float(rt), str(name),
                              str(Path(meta_path).resolve()), aug, tiles))
    return out
