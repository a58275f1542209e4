"""Packed shards: the on-disk output of ``vlmforge pack`` (no pickle anywhere).

A packed folder holds ``NNNNN.tar`` shards (plain USTAR tars, readable by webdataset and ``tar``),
one ``NNNNN.index.json`` per tar, ``manifest.json`` and ``config.yaml``. Each pack is one
webdataset sample, key ``NNNNN_PPPPPP``:

- ``{key}.json``        pack metadata: ``samples``: list of {key, kind ("image" | "text"), n_text,
                        images, sep, truncated}, ``length`` (tokens of the expanded pack);
                        packs made under an image layout (tiles or a wrap, format 2) add per
                        image sample ``size`` [width, height] and ``tiles``, and per pack
                        ``tiles`` and ``image_tokens`` (placeholders + wrap of all its images);
- ``{key}.tokens.npy``  int32 text token ids of all samples, concatenated (compact form: no
                        image tokens, no separators; the loader expands them);
- ``{key}.img{j}.{ext}`` the j-th image's original encoded bytes (never re-encoded).

The index gives the byte range of every member, so a pack is read with one seek per member
(random access; the loader needs it for exact resume) and a reader never parses the tar. Format 2
(an image layout) also gives each pack's ``tiles`` and ``image_tokens`` there, so the rank balancer
reads every pack's vision and LLM tokens from the indexes alone. Fixed-grid packs stay format 1,
byte for byte as before; readers older than format 2 refuse a format-2 shard instead of
miscounting its placeholders.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from vlmforge.files import write_json

INDEX_SUFFIX = ".index.json"
FORMAT_VERSION = 1  # fixed grid: one tile per image, no wrap
LAYOUT_FORMAT_VERSION = 2  # an image layout (tiles and/or wrap): per-sample sizes and tiles
FORMATS = (FORMAT_VERSION, LAYOUT_FORMAT_VERSION)


def image_ext(data: bytes) -> str:
    """File extension from the magic bytes (for the member name; the bytes are kept as they are)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return "img"


def tokens_to_npy(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def npy_to_tokens(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class PackedShardWriter:
    """Write one packed shard: ``add_pack`` repeatedly, then ``close`` (tar + index, atomically)."""

    def __init__(self, out_dir: str | os.PathLike, shard_index: int, format: int = FORMAT_VERSION):
        self.format = int(format)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name = f"{shard_index:05d}"
        self.tar_path = self.out_dir / f"{self.name}.tar"
        self._tmp = self.out_dir / f".{self.name}.tar.tmp{os.getpid()}"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.packs: list[dict[str, Any]] = []

    def _add(self, name: str, data: bytes) -> list[int]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        start = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        return [start + tarfile.BLOCKSIZE, len(data)]  # USTAR short names: one 512-byte header

    def add_pack(self, meta: dict, tokens: np.ndarray, images: list[bytes]) -> str:
        key = f"{self.name}_{len(self.packs):06d}"
        entry: dict[str, Any] = {"key": key, "length": int(meta["length"]), "samples": len(meta["samples"])}
        entry["json"] = self._add(f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
        entry["tokens"] = self._add(f"{key}.tokens.npy", tokens_to_npy(tokens))
        entry["images"] = [self._add(f"{key}.img{j}.{image_ext(b)}", b) for j, b in enumerate(images)]
        if self.format == LAYOUT_FORMAT_VERSION:
            entry["tiles"], entry["image_tokens"] = int(meta["tiles"]), int(meta["image_tokens"])
        self.packs.append(entry)
        return key

    def close(self) -> str:
        self._tar.close()
        os.replace(self._tmp, self.tar_path)
        write_json(
            self.out_dir / f"{self.name}{INDEX_SUFFIX}",
            {"format": self.format, "tar": self.tar_path.name, "packs": self.packs},
        )  # index last: its presence means the shard is complete
        return str(self.tar_path)

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)


class PackedShardReader:
    """Random access to the packs of one shard via its index, kept as compact numpy arrays
    (a few integers per pack and image: millions of packs stay light in every DataLoader worker)."""

    def __init__(self, index_path: str | os.PathLike):
        index_path = Path(index_path)
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        self.format = index.get("format")
        if self.format not in FORMATS:
            raise ValueError(f"{index_path}: unsupported packed-shard format {self.format!r}")
        self.tar_path = str(index_path.parent / index["tar"])
        packs = index["packs"]
        self.keys = [p["key"] for p in packs]
        self.lengths = np.array([p["length"] for p in packs], dtype=np.int64)
        self.spans = np.array([p["json"] + p["tokens"] for p in packs], dtype=np.int64).reshape(-1, 4)
        n_img = [len(p["images"]) for p in packs]
        self.img_start = np.concatenate([[0], np.cumsum(n_img)]).astype(np.int64)
        flat = [s for p in packs for s in p["images"]]
        self.img_spans = np.array(flat, dtype=np.int64).reshape(-1, 2)
        self.n_images = np.asarray(n_img, dtype=np.int64)
        # format 2: placeholders + wrap per pack; format 1: -1 (images x the folder's visual tokens)
        self.image_tokens = np.array([p.get("image_tokens", -1) for p in packs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, offset: int, size: int) -> bytes:
        fh = _open_file(self.tar_path)
        fh.seek(int(offset))
        data = fh.read(int(size))
        if len(data) != size:
            raise OSError(f"{self.tar_path}: truncated member at byte {offset}")
        return data

    def read_pack(self, i: int) -> tuple[dict, np.ndarray, list[bytes]]:
        """(metadata, int32 text tokens, image bytes) of pack ``i``."""
        jo, js, to, ts = self.spans[i].tolist()
        meta = json.loads(self._read(jo, js))
        tokens = npy_to_tokens(self._read(to, ts))
        images = [self._read(o, n) for o, n in self.img_spans[self.img_start[i] : self.img_start[i + 1]].tolist()]
        return meta, tokens, images


_OPEN: "OrderedDict[str, Any]" = OrderedDict()
_OPEN_PID: list[int] = [0]
MAX_OPEN_FILES = 64


def _open_file(path: str):
    """A per-process LRU of open shard files (forked DataLoader workers reopen their own)."""
    if _OPEN_PID[0] != os.getpid():
        _OPEN.clear()  # handles inherited over fork share offsets with the parent: never reuse them
        _OPEN_PID[0] = os.getpid()
    fh = _OPEN.get(path)
    if fh is None:
        while _OPEN and len(_OPEN) >= MAX_OPEN_FILES:
            _OPEN.popitem(last=False)[1].close()
        fh = _OPEN[path] = open(path, "rb")
    else:
        _OPEN.move_to_end(path)
    return fh


def list_packed_shards(folder: str | os.PathLike) -> list[Path]:
    """Index files of a packed folder, in shard order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"packed data folder not found: {folder}")
    found = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if not found:
        raise FileNotFoundError(f"no packed shards (*{INDEX_SUFFIX}) in {folder}; run `vlmforge pack` first")
    return found
