"""Preference rows in the formats people have, read into one :class:`PreferencePair`.

- MMPR jsonl (InternVL's preference data): ``{"image": "a.jpg" | ["a.jpg", ...], "question": ...,
  "chosen": ..., "rejected": ...[, "answer_gt": ...]}``;
- vlmforge synth's ``preference/pairs.jsonl``: ``{"image", "prompt": "<image>\\n...", "chosen",
  "rejected", "id", "category", "error"}``;
- InternVL's meta.json: ``{name: {"root": IMAGES, "annotation": FILE.jsonl, "repeat_time": r}}``,
  a list of MMPR files, each with its own image root; ``repeat_time`` < 1 keeps the first
  ``int(rows * r)`` rows of the file (as InternVL does, before its shuffle), > 1 repeats the file's
  pairs (``floor(r)`` copies, plus the first rows again for a fractional part).

A row that gives images but no ``<image>`` marker gets ``"<image>\\n"`` once per image before the
question, as InternVL does. Fields other than the question, responses and images are kept as the
pair's ``meta`` (``answer_gt``, synth's ``id`` / ``category`` / ``error``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.data.sft.records import SFTDataError, record_images
from vlmforge.errors import UserError

# Why a row is skipped (the index manifest's ``dropped`` keys; ``--strict`` names the first one).
REASONS = (
    "unparsable",
    "missing_image",
    "empty_chosen",
    "empty_rejected",
    "chosen_equals_rejected",
    "prompt_too_long",
    "path_outside_root",
    "image_marker_mismatch",
)
PAIR_FIELDS = ("question", "prompt", "chosen", "rejected", "image", "images")


class PreferenceDataError(UserError, ValueError):
    """A bad preference row or file; the message names the file and line. ``reason``: what it is
    counted under when skipped (the index manifest's ``dropped``, ``PreferenceLoader.skipped``)."""

    def __init__(self, message: str, reason: str = "unparsable"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason across processes (DataLoader workers)
        return type(self), (str(self), self.reason)


@dataclass
class PreferencePair:
    """One preference pair: a user turn (one ``<image>`` marker per image) and two replies."""

    question: str
    chosen: str
    rejected: str
    images: list[str] = field(default_factory=list)  # paths as the row writes them
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = "mmpr"  # "mmpr" (question) or "synth" (prompt)

    def messages(self) -> list[dict]:
        """The prompt as chat messages: one user turn (the chat template adds the system prompt)."""
        return [{"role": "user", "content": self.question}]


def row_to_pair(row: Any) -> PreferencePair:
    """A parsed MMPR or synth row -> :class:`PreferencePair`; :class:`PreferenceDataError` (with
    its ``reason``) for a row that is not a usable pair."""
    if not isinstance(row, dict):
        raise PreferenceDataError(f"row is a {type(row).__name__}, not an object", "unparsable")
    fmt = "mmpr" if "question" in row else "synth"
    question = row.get("question", row.get("prompt"))
    if not isinstance(question, str):
        raise PreferenceDataError("row needs a string 'question' (MMPR) or 'prompt' (vlmforge synth)", "unparsable")
    for side in ("chosen", "rejected"):
        if not isinstance(row.get(side), str):
            got = "missing" if side not in row else f"a {type(row[side]).__name__}"
            raise PreferenceDataError(f"'{side}' must be a string, got {got}", "unparsable")
    chosen, rejected = row["chosen"], row["rejected"]
    if not chosen.strip():
        raise PreferenceDataError("'chosen' is empty", "empty_chosen")
    if not rejected.strip():
        raise PreferenceDataError("'rejected' is empty", "empty_rejected")
    if chosen.strip() == rejected.strip():
        raise PreferenceDataError("'chosen' and 'rejected' are the same text", "chosen_equals_rejected")
    try:
        images = record_images(row)
    except SFTDataError as e:
        raise PreferenceDataError(str(e), "unparsable") from None
    markers = question.count(IMAGE_TOKEN)
    if markers == 0 and images:
        question = (IMAGE_TOKEN + "\n") * len(images) + question
    elif markers != len(images):
        raise PreferenceDataError(
            f"{markers} {IMAGE_TOKEN} marker(s) in the question for {len(images)} image(s)", "image_marker_mismatch"
        )
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        if IMAGE_TOKEN in text:
            raise PreferenceDataError(f"an {IMAGE_TOKEN} marker in '{side}' (images go in the question)",
                                      "image_marker_mismatch")
    meta = {k: v for k, v in row.items() if k not in PAIR_FIELDS}
    return PreferencePair(question, chosen, rejected, images, meta, fmt)


def parse_row(raw: bytes) -> PreferencePair:
    """JSON bytes of one row -> :class:`PreferencePair` (reason ``unparsable`` if the JSON is bad)."""
    try:
        row = json.loads(raw)
    except ValueError as e:
        raise PreferenceDataError(f"JSON does not parse: {e}", "unparsable") from None
    return row_to_pair(row)


# ----------------------------------------------------------------------------- source files


@dataclass
class SourceFile:
    """One file of rows to index, with the folder its image paths are relative to."""

    path: str
    image_root: str
    repeat_time: float = 1.0
    name: str | None = None  # the meta.json entry
    meta_file: str | None = None  # the meta.json it came from

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


def _is_meta(path: str) -> dict | None:
    """The parsed meta.json if ``path`` is one (a JSON object of objects with an 'annotation'), else None."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"{") or os.path.getsize(path) > 64 << 20:
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:
            obj = json.load(f)
    except ValueError:
        return None  # a jsonl file: one object per line does not parse as one JSON value
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) and "annotation" in v for v in obj.values()):
        return obj
    return None


def _near(path: str, base: Path) -> str:
    """``path`` as given (relative to the working folder, as InternVL reads it), else relative to ``base``."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return str(base / path)


def meta_sources(meta_path: str, meta: dict) -> list[SourceFile]:
    """The annotation files of an InternVL meta.json, each with its root and repeat_time."""
    base = Path(meta_path).resolve().parent
    out = []
    for name, entry in meta.items():
        where = f"{meta_path}: entry {name!r}"
        ann = entry.get("annotation")
        if not isinstance(ann, str) or not ann:
            raise UserError(f"{where}: 'annotation' must be the path of a jsonl file")
        ann = _near(ann, base)
        if not os.path.isfile(ann):
            raise UserError(f"{where}: annotation {entry['annotation']} is not a file")
        root = entry.get("root")
        if root is not None and not isinstance(root, str):
            raise UserError(f"{where}: 'root' must be a folder path")
        root = _near(root, base) if root else str(Path(ann).resolve().parent)
        if not os.path.isdir(root):
            raise UserError(f"{where}: root {entry.get('root')} is not a folder (the folder its image paths are relative to)")
        rt = entry.get("repeat_time", 1)
        if isinstance(rt, bool) or not isinstance(rt, (int, float)) or not math.isfinite(rt) or rt <= 0:
            raise UserError(f"{where}: repeat_time must be a number > 0, got {rt!r}")
        out.append(SourceFile(str(Path(ann).resolve()), str(Path(root).resolve()), float(rt), str(name),
                              str(Path(meta_path).resolve())))
    return out


def expand_inputs(inputs: Sequence[str | os.PathLike], image_root: str | os.PathLike | None = None) -> list[SourceFile]:
    """Input files -> the row files to index. A meta.json gives its annotation files (their own roots);
    any other file (MMPR or synth jsonl, or a JSON array of rows) is rows whose image paths are
    relative to ``image_root``, or to the file's own folder when ``image_root`` is None (synth's
    ``preference/pairs.jsonl`` lies next to its ``images/``)."""
    out: list[SourceFile] = []
    for p in map(str, inputs):
        if not os.path.isfile(p):
            raise UserError(f"preference data {p}: no such file (an MMPR / synth .jsonl or an InternVL meta.json)")
        meta = _is_meta(p)
        if meta is not None:
            out.extend(meta_sources(p, meta))
            continue
        root = str(Path(image_root).resolve()) if image_root is not None else str(Path(p).resolve().parent)
        out.append(SourceFile(str(Path(p).resolve()), root))
    if len(out) > 65535:
        raise UserError("at most 65535 row files per preference index")
    return out
