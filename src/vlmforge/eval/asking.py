"""Questions in the eval formats read for another stage: every skipped row kept with its file:line,
and an item's images loaded with the reason they fail.

``vlmforge preference build`` asks a model training-split questions written like benchmark rows
(same kinds, same prompts, same scorers) and, being a long job, skips bad rows and lists where
they were; ``tasks.load_items`` keeps only counts, and the runner's image loading is private.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlmforge.eval.items import EvalItem, ImageRoot, RowError, TaskError
from vlmforge.eval.kinds import get_kind
from vlmforge.eval.readers import read_rows
from vlmforge.eval.specs import check_kind
from vlmforge.files import note_example
from vlmforge.imagedecode import ImageTooLargeError

# (row, image root, "file:line") -> item; raises RowError naming what is wrong
RowParser = Callable[[dict, Path, str], EvalItem]


@dataclass
class ReadItems:
    """The valid items of one file, and its bad rows: counts by reason, a few file:line examples each."""

    items: list[EvalItem]
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)


def skip_reason(error: Exception) -> str:
    """The counting key of a row error: its message up to the first ':' or '(' (as ``load_items`` counts)."""
    return re.split(r"[:(]", str(error))[0].strip()


def read_items(
    path: str | os.PathLike, parse_row: RowParser, image_root: str | os.PathLike | None = None,
    strict: bool = False, allow_absolute_paths: bool = False,
) -> ReadItems:
    """Items of a jsonl / parquet / TSV file parsed by ``parse_row``; duplicate ids are bad rows.

    ``strict``: the first bad row raises ``TaskError`` naming file:line; otherwise it is skipped and
    counted. Image paths must resolve inside ``image_root`` (default: the file's folder)."""
    root = ImageRoot(image_root if image_root is not None else Path(path).parent)
    root.allow_absolute_paths = bool(allow_absolute_paths)
    out = ReadItems(items=[])
    skipped: Counter = Counter()
    seen: set[str] = set()
    for where, row in read_rows(path):
        try:
            if isinstance(row, RowError):
                raise row
            item = parse_row(row, root, where)
            if item.id in seen:
                raise RowError(f"duplicate id {item.id!r}")
            seen.add(item.id)
        except RowError as e:
            if strict:
                raise TaskError(f"{where}: {e}") from None
            reason = skip_reason(e)
            skipped[reason] += 1
            note_example(out.examples, reason, {"where": where, "error": str(e)})
            continue
        out.items.append(item)
    out.skipped = dict(skipped)
    return out


def read_questions(
    path: str | os.PathLike, kind: str, image_root: str | os.PathLike | None = None,
    strict: bool = False, allow_absolute_paths: bool = False,
) -> ReadItems:
    """A task file read as kind ``kind`` (the rows ``vlmforge eval`` reads), bad rows with file:line."""
    check_kind(kind, str(path))
    return read_items(path, get_kind(kind).parse_row, image_root, strict, allow_absolute_paths)


class ItemImageError(ValueError):
    """An item's image does not load; ``reason`` is the key it is counted under."""

    def __init__(self, message: str, reason: str = "image decode error"):
        super().__init__(message)
        self.reason = reason


def load_item_images(item: EvalItem) -> list:
    """The item's images decoded to RGB (``ImageRef.load``), or ``ItemImageError`` saying why not."""
    try:
        return [ref.load() for ref in item.images]
    except ImageTooLargeError as e:  # over the pixel cap: its own reason, the cap in the message
        raise ItemImageError(f"item {item.id!r}: image_too_large: {e}", ImageTooLargeError.reason) from None
    except Exception as e:  # PIL raises several types for bad bytes
        raise ItemImageError(f"item {item.id!r}: cannot decode image: {e}") from None
