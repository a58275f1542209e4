"""Small readers the demo report's sections share: JSON files that may be missing or cut by a
kill, a key anywhere in a manifest, a number or a "Not shown" note."""

from __future__ import annotations

import json
from pathlib import Path

from vlmforge.report.builder import Section

# the evaluations the demo runs, in order: (label in the report, folder under eval/)
PHASES = [("before training", "init"), ("after pretraining", "pretrain"), ("after SFT", "sft"), ("after MPO", "mpo")]


def read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return out if isinstance(out, dict) else {}


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file ([] if missing); a line cut by a kill or not an object is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def find_key(obj, key: str):
    """The first value stored under ``key`` anywhere in a nested manifest."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = find_key(v, key)
            if found is not None:
                return found
    return None


def missing(title: str, what: str) -> Section:
    return Section(title, note=f"Not shown: {what}.")


def fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
