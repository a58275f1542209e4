"""Task files as rows: jsonl, parquet (Hugging Face datasets layout) and VLMEvalKit TSV.

``read_rows`` yields ``(file:line, row)``; a row that cannot be read is yielded as a ``RowError``
so that the loader reports it (strict) or counts it (lenient) like any other bad row.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from vlmforge.eval.items import IMAGE_EXTENSIONS, RowError, TaskError
from vlmforge.files import numbered_lines


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict | RowError]]:
    """Yield (``file:line``, row) for a jsonl, parquet or VLMEvalKit TSV file."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".tsv":
        yield from _read_tsv(path)
    else:
        raise TaskError(f"{path}: unsupported task file type {suffix!r} (use .jsonl, .parquet or .tsv)")


def _read_jsonl(path: Path):
    for where, line in numbered_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, RowError(f"invalid JSON ({e.msg})")
            continue
        yield where, row if isinstance(row, dict) else RowError("expected a JSON object")


def _read_parquet(path: Path):
    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _read_tsv(path: Path):
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KB default
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = []
        for row in reader:
            clean = {k: (None if v == "" else v) for k, v in row.items() if k is not None}
            rows.append((f"{path}:{reader.line_num}", clean))
    # A repeated image is stored once; other rows hold the index of the row that has it.
    by_index = {str(r.get("index")): r.get("image") for _, r in rows}
    for where, row in rows:
        img = row.get("image")
        if isinstance(img, str) and len(img) <= 64 and not img.lower().endswith(IMAGE_EXTENSIONS):
            target = by_index.get(img)
            if not target or len(target) <= 64:
                yield where, RowError(f"image refers to row index {img!r}, which holds no image")
                continue
            row["image"] = target
        row["_tsv"] = True  # VLMEvalKit layout: index >= 1e6 marks MMBench's circular copies
        yield where, row
