"""Evaluation items, the images they point at, and the row fields every kind reads the same way.

A kind's ``parse_row`` (``vlmforge.eval.kinds``) starts from ``common_item`` (id, question, images,
hint, metadata) and adds its own fields; a bad row raises ``RowError``, which the loader turns into
a ``TaskError`` naming ``file:line`` (or a skipped-row count).
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmforge.files import PathOutsideRootError, resolve_inside
from vlmforge.imagedecode import decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Row fields kept as item metadata (per-category metrics, POPE splits, math units).
META_FIELDS = ("category", "l2-category", "object", "sampling", "split", "unit")


class TaskError(ValueError):
    """A task spec or task file is invalid; the message names the file (and line)."""


class RowError(ValueError):
    """One row is invalid; the loader adds file:line."""


class ImageRoot(type(Path())):
    """A task's image folder (a ``Path``): row image paths must resolve inside it;
    ``allow_absolute_paths`` (set by the loader, off by default) also accepts absolute ones."""

    allow_absolute_paths = False


@dataclass(frozen=True)
class ImageRef:
    """An image not yet decoded: a file path, base64 text, or raw bytes."""

    kind: str  # path | base64 | bytes
    value: Any

    def read_bytes(self) -> bytes:
        if self.kind == "path":
            return Path(self.value).read_bytes()
        if self.kind == "base64":
            return base64.b64decode(self.value)
        return self.value

    def load(self):
        """The decoded RGB image (``vlmforge.imagedecode.decode_image``: 16-bit scaled, alpha on white,
        ``ImageTooLargeError`` over the pixel cap)."""
        return decode_image(self.read_bytes())

    def key(self) -> str:
        """Identity used to keep a query's own image out of its k-shot demonstrations."""
        if self.kind == "path":
            return "path:" + os.path.abspath(self.value)
        data = self.value.encode() if isinstance(self.value, str) else self.value
        return "sha1:" + hashlib.sha1(data).hexdigest()


@dataclass
class EvalItem:
    id: str
    question: str
    images: list[ImageRef]
    answer: str | None = None  # mcq letter | pope yes/no | math reference
    answers: list[str] | None = None  # vqa human answers
    options: dict[str, str] | None = None  # letter -> text (mcq, math multi_choice)
    hint: str | None = None
    group: str | None = None  # CircularEval: rotations of one question share a group
    meta: dict = field(default_factory=dict)  # category, rotation, answer_type, precision, source, ...


def literal(value):
    """Lists/dicts stored as Python literals in TSV cells ("['a', 'b']"); safe, no eval."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def require(row: dict, key: str):
    """The value of a required field; RowError when it is missing or blank."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError(f"missing field {key!r}")
    return value


def item_id(row: dict, where: str) -> str:
    for key in ("id", "index", "question_id", "pid"):
        if row.get(key) is not None:
            return str(row[key])
    return where.rsplit(":", 1)[-1].strip()


def _looks_like_path(value: str, source: str, image_root: Path) -> bool:
    if source == "image_path" or value.lower().endswith(IMAGE_EXTENSIONS):
        return True
    return len(value) < 4096 and (Path(value).is_file() or (image_root / value).is_file())


def image_refs(row: dict, image_root: Path) -> list[ImageRef]:
    """The row's images (``images``, ``image`` or ``image_path``): paths, base64 text or bytes."""
    raw = None
    for key in ("images", "image", "image_path"):
        if row.get(key) is not None:
            raw, source = row[key], key
            break
    if raw is None:
        raise RowError("no image (expected 'image', 'images' or 'image_path')")
    raw = literal(raw)
    values = raw if isinstance(raw, list) else [raw]
    refs = []
    for v in values:
        if isinstance(v, dict):
            v = v.get("bytes") or v.get("path")
        if isinstance(v, (bytes, bytearray)):
            refs.append(ImageRef("bytes", bytes(v)))
        elif isinstance(v, str) and _looks_like_path(v, source, image_root):
            try:  # inside the image root, symlinks resolved (absolute paths only when opted in)
                p = resolve_inside(image_root, v, allow_absolute=getattr(image_root, "allow_absolute_paths", False))
            except PathOutsideRootError as e:
                raise RowError(f"{e.reason}: {e}") from None
            if not p.is_file():
                raise RowError(f"image file not found: {p}")
            refs.append(ImageRef("path", str(p)))
        elif isinstance(v, str):
            head = v[: (min(len(v), 4096) // 4) * 4]
            try:  # check the start now so a broken cell is reported with its line
                base64.b64decode(head, validate=True)
            except binascii.Error:
                raise RowError("image is neither an existing file nor base64") from None
            refs.append(ImageRef("base64", v))
        else:
            raise RowError(f"cannot read image value of type {type(v).__name__}")
    return refs


def common_item(row: dict, image_root: Path, where: str) -> EvalItem:
    """The fields every kind shares: id, question, images, hint, and metadata (``source`` = file:line)."""
    meta = {"source": where}
    for key in META_FIELDS:
        if row.get(key) is not None:
            meta[key] = row[key]
    return EvalItem(
        id=item_id(row, where),
        question=str(require(row, "question")),
        images=image_refs(row, image_root),
        hint=str(row["hint"]) if row.get("hint") is not None else None,
        meta=meta,
    )
