"""Preference rows in the formats people have, read into one :class:`PreferencePair`.

- MMPR jsonl (InternVL's preference data): ``{"image": "a.jpg" | ["a.jpg", ...], "question": ...,
  "chosen": ..., "rejected": ...[, "answer_gt": ...]}``;
- vlmforge synth's ``preference/pairs.jsonl``: ``{"image", "prompt": "<image>\\n...", "chosen",
  "rejected", "id", "category", "error"}``;
- InternVL's meta.json: ``{name: {"root": IMAGES, "annotation": FILE.jsonl, "repeat_time": r}}``,
  a list of MMPR files, each with its own image root; ``repeat_time`` < 1 keeps the first
  ``int(rows * r)`` rows of the file (as InternVL does, before its shuffle), > 1 repeats the file's
  pairs (``floor(r)`` copies, plus the first rows again for a fractional part). The reader is
  shared with SFT (:mod:`vlmforge.data.sft.meta`).

A row that gives images but no ``<image>`` marker gets ``"<image>\\n"`` once per image before the
question, as InternVL does. Fields other than the question, responses and images are kept as the
pair's ``meta`` (``answer_gt``, synth's ``id`` / ``category`` / ``error``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.data.sft.meta import SourceFile, meta_sources, read_meta
from vlmforge.data.sft.meta import repeated as repeated  # re-exported: the meta reader is shared with SFT
from vlmforge.data.sft.meta import rows_read as rows_read
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


def expand_inputs(inputs: Sequence[str | os.PathLike], image_root: str | os.PathLike | None = None) -> list[SourceFile]:
    """Input files -> the row files to index. A meta.json gives its annotation files (their own roots);
    any other file (MMPR or synth jsonl, or a JSON array of rows) is rows whose image paths are
    relative to ``image_root``, or to the file's own folder when ``image_root`` is None (synth's
    ``preference/pairs.jsonl`` lies next to its ``images/``)."""
    out: list[SourceFile] = []
    for p in map(str, inputs):
        if not os.path.isfile(p):
            raise UserError(f"preference data {p}: no such file (an MMPR / synth .jsonl or an InternVL meta.json)")
        meta = read_meta(p)
        if meta is not None:
            out.extend(meta_sources(p, meta))
            continue
        root = str(Path(image_root).resolve()) if image_root is not None else str(Path(p).resolve().parent)
        out.append(SourceFile(str(Path(p).resolve()), root))
    if len(out) > 65535:
        raise UserError("at most 65535 row files per preference index")
    return out
