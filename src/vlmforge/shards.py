"""Caption shards in img2dataset's webdataset layout: write, list, read raw (decoding: ``imagedecode``).

Layout (what ``img2dataset --output_format webdataset`` produces, so real downloads and the
synthetic world are read by the same code)::

    00000.tar            {key}.jpg  {key}.txt  {key}.json   (successful samples only)
    00000.parquet        one row per sample, columns = the json fields (failed ones too)
    00000_stats.json     count, successes, failed_to_download, failed_to_resize, status_dict, ...

Keys are img2dataset's: ``shard_index * 10**oom_samples + i`` zero-padded to ``oom_samples + 5``
digits; ShardWriter uses img2dataset's default key space (10**4 per shard), so keys have 9 digits
for up to 10,000 samples per shard, e.g. ``000010012`` = shard 1, sample 12.

Reading never decodes images (``iter_raw_samples``); damaged members come back with ``error`` set
instead of raising, so long jobs can skip and count them. ``vlmforge.imagedecode.decode_image`` is
the one place that turns bytes into an RGB ``PIL.Image``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand

from vlmforge.errors import UserError
from vlmforge.files import atomic_write_bytes, write_json
from vlmforge.imagedecode import open_image

SHARD_DIGITS = 5  # img2dataset's oom_shard_count default
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# The json/parquet fields every sample carries, in img2dataset's order (uid first: DataComp style).
STANDARD_FIELDS = (
    "uid",
    "caption",
    "url",
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
)
_INT_FIELDS = ("width", "height", "original_width", "original_height")


class NoShardsError(UserError, FileNotFoundError):
    """A shard path/glob that matches no tar file."""


@dataclass
class RawSample:
    """One sample as stored: bytes and text, nothing decoded. ``error`` set if damaged."""

    key: str
    image_bytes: bytes | None = None
    caption: str | None = None
    meta: dict = field(default_factory=dict)
    error: str | None = None
    shard: str = ""  # path of the tar it came from (for error messages)


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


def img2dataset_key(shard_index: int, index_in_shard: int, samples_per_shard: int = 10_000) -> str:
    """img2dataset's ``compute_key``: shard * 10**oom + i, padded to oom + 5 digits."""
    oom = max(1, math.ceil(math.log10(samples_per_shard)))
    return f"{shard_index * 10**oom + index_in_shard:0{oom + SHARD_DIGITS}d}"


def sequential_key(index: int, samples_per_shard: int, start_index: int = 0) -> str:
    """Key of the ``index``-th sample a ShardWriter writes (img2dataset numbering with its default
    10**4 key space per shard, so keys have at least 9 digits)."""
    shard, i = divmod(index, samples_per_shard)
    return img2dataset_key(start_index + shard, i, max(samples_per_shard, 10_000))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _probe_size(image_bytes: bytes) -> tuple[int | None, int | None]:
    """Width/height from the image header only (works on truncated JPEGs); None if unreadable."""
    try:
        with open_image(io.BytesIO(image_bytes)) as im:
            return int(im.width), int(im.height)
    except Exception:  # any unreadable header just means "size unknown"
        return None, None


class ShardWriter:
    """Write samples into ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json`` shards.

    A new shard starts every ``samples_per_shard`` writes. Tars are built in a temp file and renamed
    on close of each shard, so a killed run never leaves a half tar under the final name. Tar members
    have fixed mtime/uid/gid/mode, and with ``timestamps=False`` the stats carry no wall-clock times,
    so the same samples give byte-identical shards.

    ``write(key, image_bytes, caption, meta)``: ``meta`` may hold any extra fields (uid, url, ...);
    ``key``, ``caption`` and ``sha256`` (of ``image_bytes``) are always set by the writer; ``status``
    defaults to "success", ``width``/``height`` (and ``original_*``) to the size read from the image
    header. ``image_bytes=None`` records a failed sample (parquet + stats only, like img2dataset).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        samples_per_shard: int = 10_000,
        start_index: int = 0,
        *,
        timestamps: bool = True,
        json_indent: int = 4,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shard_index = start_index
        self.timestamps = timestamps
        self.json_indent = json_indent
        self.written: list[str] = []  # finished tar paths
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._rows: list[dict] = []
        self._n_in_shard = 0
        self._start_time = 0.0

    # -- keys -------------------------------------------------------------------------------
    def next_key(self) -> str:
        """The img2dataset key the next ``write`` would naturally use."""
        shard, i = self.shard_index, self._n_in_shard
        if i >= self.samples_per_shard:
            shard, i = shard + 1, 0
        return img2dataset_key(shard, i, max(self.samples_per_shard, 10_000))

    # -- writing ----------------------------------------------------------------------------
    def _open(self) -> None:
        name = shard_name(self.shard_index)
        self._tmp_path = self.out_dir / f".{name}.tar.tmp{os.getpid()}"
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.GNU_FORMAT)
        self._rows = []
        self._n_in_shard = 0
        self._start_time = time.time() if self.timestamps else 0.0

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image_bytes: bytes | None, caption: str | None, meta: dict | None = None) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"shard key must not contain '.' or '/': {key!r}")
        if self._tar is None:
            self._open()
        elif self._n_in_shard >= self.samples_per_shard:
            self._finish_shard()
            self.shard_index += 1
            self._open()

        row: dict[str, Any] = {f: None for f in STANDARD_FIELDS}
        row.update(meta or {})
        row["key"] = key
        row["caption"] = caption
        if image_bytes is not None:
            row["sha256"] = sha256_hex(image_bytes)
            row["status"] = row["status"] or "success"
            if row["width"] is None or row["height"] is None:
                w, h = _probe_size(image_bytes)
                row["width"] = w if row["width"] is None else row["width"]
                row["height"] = h if row["height"] is None else row["height"]
            if row["original_width"] is None:
                row["original_width"] = row["width"]
            if row["original_height"] is None:
                row["original_height"] = row["height"]
            self._add_member(f"{key}.jpg", image_bytes)
            self._add_member(f"{key}.txt", (caption or "").encode("utf-8"))
            self._add_member(f"{key}.json", json.dumps(row, indent=self.json_indent).encode("utf-8"))
        else:
            row["status"] = row["status"] if row["status"] not in (None, "success") else "failed_to_download"
            row["error_message"] = row["error_message"] or "no image bytes"
        self._rows.append(row)
        self._n_in_shard += 1

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None
        self._tar.close()
        name = shard_name(self.shard_index)
        tar_path = self.out_dir / f"{name}.tar"

        # Parquet: standard fields with fixed types, extra meta columns inferred.
        std = [
            pa.field(f, pa.int64() if f in _INT_FIELDS else pa.string()) for f in STANDARD_FIELDS
        ]
        extra = [k for k in dict.fromkeys(k for r in self._rows for k in r) if k not in STANDARD_FIELDS]
        columns = {f.name: pa.array([r.get(f.name) for r in self._rows], type=f.type) for f in std}
        for k in extra:
            columns[k] = pa.array([r.get(k) for r in self._rows])
        table = pa.table(columns)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(self.out_dir / f"{name}.parquet", buf.getvalue())

        statuses = Counter(
            "success" if r["status"] == "success" else (r["error_message"] or r["status"]) for r in self._rows
        )
        end = time.time() if self.timestamps else 0.0
        write_json(
            self.out_dir / f"{name}_stats.json",
            {
                "count": len(self._rows),
                "successes": sum(r["status"] == "success" for r in self._rows),
                "failed_to_download": sum(r["status"] == "failed_to_download" for r in self._rows),
                "failed_to_resize": sum(r["status"] == "failed_to_resize" for r in self._rows),
                "duration": end - self._start_time,
                "start_time": self._start_time,
                "end_time": end,
                "status_dict": dict(sorted(statuses.items())),
            },
        )
        os.replace(self._tmp_path, tar_path)  # tar last: its presence means the shard is complete
        self.written.append(str(tar_path))
        self._tar = None
        self._tmp_path = None

    def close(self) -> list[str]:
        """Finish the open shard; returns all tar paths written."""
        if self._tar is not None:
            self._finish_shard()
            self.shard_index += 1
        return self.written

    def abort(self) -> None:
        """Drop the shard in progress (temp file removed)."""
        if self._tar is not None:
            self._tar.close()
            if self._tmp_path is not None and self._tmp_path.exists():
                self._tmp_path.unlink()
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- listing -------------------------------------------------------------------------------
def list_shards(path: str | os.PathLike | list) -> list[str]:
    """Tar shards named by a folder, a glob, a brace pattern ``a/{00000..00009}.tar``, a file, or a list."""
    if isinstance(path, (list, tuple)):
        return [p for item in path for p in list_shards(item)]
    s = str(path)
    if os.path.isdir(s):
        found = sorted(glob.glob(os.path.join(glob.escape(s), "*.tar")))
    elif os.path.isfile(s):
        if not s.endswith((".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")):
            raise NoShardsError(f"{s} is not a .tar shard (give tar files, their folder or a glob)")
        found = [s]
    else:
        patterns = list(braceexpand(s)) if "{" in s else [s]
        found = []
        for p in patterns:
            found.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if os.path.isfile(p) else []))
    if not found:
        raise NoShardsError(f"no .tar shards found at {s!r}")
    return found


# -- reading -------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's rule: key = path up to the first dot of the basename, ext = the rest."""
    base = os.path.basename(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    prefix = os.path.dirname(name)
    return (f"{prefix}/{stem}" if prefix else stem), ext.lower()


def _to_sample(key: str, parts: dict[str, bytes], shard: str) -> RawSample:
    sample = RawSample(key=key, shard=shard)
    errors = []
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if img_ext is None:
        errors.append("missing image member")
    else:
        sample.image_bytes = parts[img_ext]
    if "txt" in parts:
        try:
            sample.caption = parts["txt"].decode("utf-8")
        except UnicodeDecodeError:
            errors.append("caption is not valid utf-8")
    else:
        errors.append("missing .txt member")
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            sample.meta = meta
        except (ValueError, UnicodeDecodeError) as e:
            errors.append(f"bad .json member: {e}")
    if errors:
        sample.error = "; ".join(errors)
    return sample


def iter_raw_samples(tar_path: str | os.PathLike) -> Iterator[RawSample]:
    """Samples of one tar in order, grouped by key, undecoded. Never raises on damaged content:
    a truncated/unreadable tar ends with a sample whose ``error`` says so (missing file does raise)."""
    tar_path = str(tar_path)
    if not os.path.isfile(tar_path):
        raise NoShardsError(f"shard not found: {tar_path}")
    cur_key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(tar_path, "r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if key is None or ext is None:
                    continue
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                if key != cur_key:
                    if cur_key is not None:
                        yield _to_sample(cur_key, parts, tar_path)
                    cur_key, parts = key, {}
                parts[ext] = data
            # tarfile ends silently at a truncated header; a whole tar has two zero blocks after
            # its last member, so a shorter file was cut off.
            end = tf.offset
        if os.path.getsize(tar_path) < end + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError("file ends before the end-of-archive marker (truncated)")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if cur_key is not None:
            s = _to_sample(cur_key, parts, tar_path)
            s.error = f"{s.error + '; ' if s.error else ''}damaged tar: {e}"
            yield s
        else:
            yield RawSample(key="", error=f"damaged tar {tar_path}: {e}", shard=tar_path)
        return
    if cur_key is not None:
        yield _to_sample(cur_key, parts, tar_path)


def read_shard_table(tar_path: str | os.PathLike):
    """The ``NNNNN.parquet`` beside a tar, as a pyarrow Table."""
    return pq.read_table(str(tar_path)[: -len(".tar")] + ".parquet")


def read_shard_stats(tar_path: str | os.PathLike) -> dict:
    with open(str(tar_path)[: -len(".tar")] + "_stats.json", encoding="utf-8") as f:
        return json.load(f)


def shard_shortfall(tar_path: str | os.PathLike, n_read: int) -> dict | None:
    """``{"shard", "expected", "read", "missing"}`` when the tar's ``_stats.json`` counts more
    successes than the ``n_read`` samples read from it (a truncated or cut tar); None when it holds
    them all or has no readable stats file (nothing to compare with)."""
    try:
        expected = read_shard_stats(tar_path).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(expected, int) or n_read >= expected:
        return None
    return {"shard": str(tar_path), "expected": expected, "read": int(n_read), "missing": expected - int(n_read)}
