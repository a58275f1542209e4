"""Text-only documents for mixing into the packs (InternVL3-style): a corpus cut into token chunks."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

from vlmforge.errors import UserError


def iter_text_chunks(paths: list[str], tok, chunk_len: int, batch: int = 256) -> Iterator[tuple[str, list[int], bool]]:
    """(key, token ids, ends_document) chunks of a .txt (one document per line) / .jsonl ({"text"}) corpus."""

    def docs() -> Iterator[tuple[str, str]]:
        for path in paths:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    if path.endswith(".jsonl"):
                        try:
                            text = json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError) as e:
                            raise UserError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from None
                    else:
                        text = line
                    if text.strip():
                        yield f"{os.path.basename(path)}:{n}", text

    buf: list[tuple[str, str]] = []

    def flush():
        enc = tok([t for _, t in buf], add_special_tokens=False)["input_ids"]
        for (key, _), ids in zip(buf, enc):
            for c in range(0, len(ids), chunk_len):
                yield f"{key}#{c // chunk_len}", ids[c : c + chunk_len], c + chunk_len >= len(ids)
        buf.clear()

    for item in docs():
        buf.append(item)
        if len(buf) >= batch:
            yield from flush()
    if buf:
        yield from flush()


def resolve_corpus(spec: str) -> list[str]:
    paths = sorted(p for part in spec.split(",") for p in (glob.glob(part.strip()) or [part.strip()]))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"pack.text_corpus: file(s) not found: {', '.join(missing)}")
    return paths
