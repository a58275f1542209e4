"""Build a preference index (``vlmforge preference index`` runs this): read and measure the rows once.

Per row file (meta.json entries expanded, :func:`.formats.expand_inputs`): find the rows' byte spans
without parsing (:func:`vlmforge.data.sft.scan.scan_records`), take the rows ``repeat_time`` says,
parse and check them in chunks (JSON, the pair's fields, image paths inside the root and present),
count prompt and response tokens one tokenizer call per chunk (:mod:`.tokens`), then write the
kept pairs' columns as ``.npy`` arrays and ``manifest.json`` (the format: :mod:`.index`). Bad rows
are skipped and counted per reason (:data:`.formats.REASONS`) with file:line examples, or stop the
build at the first one in strict mode.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from vlmforge.config.recipe import Recipe
from vlmforge.data.preference.formats import (
    PreferenceDataError,
    SourceFile,
    expand_inputs,
    parse_row,
    repeated,
    rows_read,
)
from vlmforge.data.preference.index import ARRAYS, INDEX_VERSION, STAGE
from vlmforge.data.preference.tokens import prompt_lengths, response_lengths
from vlmforge.data.sft.scan import scan_records
from vlmforge.files import (
    PathOutsideRootError,
    atomic_write_bytes,
    file_stamp,
    note_example,
    resolve_inside,
    write_manifest,
)
from vlmforge.text.tokenization import load_tokenizer, tokenizer_fingerprint

ROWS_PER_CHUNK = 2048  # rows parsed, then tokenized in one batch call per field


def build_preference_index(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike,
    visual_tokens: int,
    max_len: int,
    image_root: str | os.PathLike | None = None,
    strict: bool = False,
    allow_absolute_paths: bool = False,
    progress: bool = True,
    config: Recipe | None = None,
) -> dict:
    """Index the pairs of ``inputs`` (MMPR / synth jsonl files, InternVL meta.json files) into
    ``out_dir``; returns the manifest. ``visual_tokens``: tokens each image becomes; a pair whose
    prompt + longer response exceeds ``max_len`` is skipped (``prompt_too_long``). Image paths stay
    inside their root (``image_root``, a meta entry's ``root``, or the row file's folder) unless
    ``allow_absolute_paths`` accepts absolute ones. ``strict``: stop at the first bad row
    (:class:`PreferenceDataError` naming file:line and the reason)."""
    if visual_tokens < 1:
        raise ValueError(f"visual_tokens must be >= 1, got {visual_tokens}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not inputs:
        raise ValueError("no preference files given")
    tok = load_tokenizer(tokenizer)
    sources = expand_inputs(inputs, image_root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(tok, int(visual_tokens), int(max_len), bool(allow_absolute_paths), bool(strict))
    parts: list[dict[str, np.ndarray]] = []
    described = []
    with tqdm(desc="preference index", unit="row", disable=not progress) as bar:
        for fid, src in enumerate(sources):
            cols, info = _index_file(fid, src, ctx, bar)
            parts.append(cols)
            described.append(info)
    cols = {name: np.concatenate([p[name] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)
            for name, dtype in ARRAYS.items()}
    for name, dtype in ARRAYS.items():
        _save_npy(out / f"{name}.npy", np.ascontiguousarray(cols[name], dtype=dtype))
    manifest = write_manifest(
        out,
        STAGE,
        inputs=[file_stamp(str(p)) for p in inputs],
        config=config,
        counts=_counts(cols, described),
        dropped=dict(sorted(ctx.dropped.items())),
        dropped_examples=ctx.examples,
        sources=described,
        index_version=INDEX_VERSION,
        visual_tokens=int(visual_tokens),
        max_len=int(max_len),
        allow_absolute_paths=bool(allow_absolute_paths),
        tokenizer=str(tokenizer),
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        arrays=list(ARRAYS),
    )
    return json.loads(manifest.read_text())


class _Context:
    """What every chunk needs: tokenizer, limits, caches, and the skipped rows so far."""

    def __init__(self, tok, visual_tokens: int, max_len: int, allow_absolute: bool, strict: bool):
        self.tok, self.visual_tokens, self.max_len = tok, visual_tokens, max_len
        self.allow_absolute, self.strict = allow_absolute, strict
        self.dropped: dict[str, int] = {}
        self.examples: dict[str, list[dict]] = {}
        self.exists: dict[str, bool] = {}
        self.dirs: dict[str, str] = {}

    def record(self, path: str, bad: list[tuple[int, str, str]]) -> None:
        """Count one chunk's bad rows ((line, reason, message)); strict: raise the first in file order."""
        bad.sort(key=lambda b: b[0])
        if self.strict and bad:
            line, reason, message = bad[0]
            raise PreferenceDataError(f"{path}:{line}: {reason}: {message}", reason)
        for line, reason, message in bad:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            note_example(self.examples, reason, {"file": path, "line": int(line), "error": message})


def _index_file(fid: int, src: SourceFile, ctx: _Context, bar) -> tuple[dict[str, np.ndarray], dict]:
    offs, nbytes, lines = scan_records(src.path)
    if nbytes.size and int(nbytes.max()) >= 2**32:
        raise PreferenceDataError(f"{src.path}: a row is larger than 4 GiB")
    n = rows_read(int(offs.size), src.repeat_time)
    offs, nbytes, lines = offs[:n], nbytes[:n], lines[:n]
    keep = np.zeros(n, bool)
    n_img = np.zeros(n, np.int64)
    p_text = np.zeros(n, np.int64)
    chosen = np.zeros(n, np.int64)
    rejected = np.zeros(n, np.int64)
    formats: dict[str, int] = {}
    with open(src.path, "rb") as f:
        for a in range(0, n, ROWS_PER_CHUNK):
            b = min(n, a + ROWS_PER_CHUNK)
            f.seek(int(offs[a]))
            buf = f.read(int(offs[b - 1] + nbytes[b - 1] - offs[a]))
            _chunk(src, ctx, buf, int(offs[a]), offs[a:b], nbytes[a:b], lines[a:b], a,
                   keep, n_img, p_text, chosen, rejected, formats)
            bar.update(b - a)
    p_full = p_text + n_img * (ctx.visual_tokens - 1)
    kept = repeated(np.flatnonzero(keep), src.repeat_time)
    cols = {
        "offsets": offs[kept], "nbytes": nbytes[kept], "file_id": np.full(kept.size, fid), "line": lines[kept],
        "n_images": n_img[kept], "prompt_text_tokens": p_text[kept], "prompt_tokens": np.minimum(p_full[kept], 2**32 - 1),
        "chosen_tokens": chosen[kept], "rejected_tokens": rejected[kept],
    }
    st = os.stat(src.path)
    info = {**src.describe(), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "rows_read": int(n),
            "rows_kept": int(keep.sum()), "pairs": int(kept.size), "formats": formats}
    return cols, info


def _chunk(src: SourceFile, ctx: _Context, buf: bytes, base: int, offs, nbytes, lines, a: int,
           keep, n_img, p_text, chosen, rejected, formats: dict) -> None:
    """Parse and check rows [a, a + len(offs)) of one file; fill the columns of the good ones."""
    good: list[tuple[int, Any]] = []  # (row position in the file's arrays, pair)
    bad: list[tuple[int, str, str]] = []  # (line, reason, message)
    for k in range(offs.size):
        s = int(offs[k]) - base
        raw = buf[s : s + int(nbytes[k])]
        if not raw.strip():
            continue  # a whitespace-only line is no row
        line = int(lines[k])
        try:
            pair = parse_row(raw)
        except PreferenceDataError as e:
            bad.append((line, e.reason, str(e)))
            continue
        try:
            paths = [str(resolve_inside(src.image_root, im, allow_absolute=ctx.allow_absolute, dir_cache=ctx.dirs))
                     for im in pair.images]
        except PathOutsideRootError as e:
            bad.append((line, e.reason, str(e)))
            continue
        missing = next((p for p in paths if not _exists(ctx, p)), None)
        if missing is not None:
            bad.append((line, "missing_image", f"image file not found: {missing}"))
            continue
        if len(paths) > 65535:
            bad.append((line, "image_marker_mismatch", f"{len(paths)} images (at most 65535)"))
            continue
        good.append((a + k, pair))
        formats[pair.format] = formats.get(pair.format, 0) + 1
    _measure(src, ctx, good, bad, lines, a, keep, n_img, p_text, chosen, rejected, formats)
    ctx.record(src.path, bad)


def _measure(src: SourceFile, ctx: _Context, good: list, bad: list, lines, a: int,
             keep, n_img, p_text, chosen, rejected, formats: dict) -> None:
    """Token lengths of the chunk's parsed pairs (one tokenizer call per field); too long ones are bad."""
    if not good:
        return
    try:
        lengths = _lengths(ctx.tok, [p for _, p in good])
    except Exception:  # find the rows the tokenizer / chat template refuses, one by one
        lengths, kept = [], []
        for i, pair in good:
            try:
                lengths += _lengths(ctx.tok, [pair])
                kept.append((i, pair))
            except Exception as e:
                formats[pair.format] -= 1
                bad.append((int(lines[i - a]), "unparsable", f"the tokenizer refuses it: {type(e).__name__}: {e}"))
        good = kept
    for (i, pair), (pl, cl, rl) in zip(good, lengths):
        prompt = pl + len(pair.images) * (ctx.visual_tokens - 1)
        if prompt + max(cl, rl) > ctx.max_len:
            formats[pair.format] -= 1
            bad.append((int(lines[i - a]), "prompt_too_long",
                        f"prompt {prompt} + longer response {max(cl, rl)} tokens > max_len {ctx.max_len}"))
            continue
        keep[i] = True
        n_img[i], p_text[i], chosen[i], rejected[i] = len(pair.images), pl, cl, rl


def _lengths(tok, pairs: list) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of each pair, one tokenizer call per field."""
    return list(zip(prompt_lengths(tok, [p.question for p in pairs]), response_lengths(tok, [p.chosen for p in pairs]),
                    response_lengths(tok, [p.rejected for p in pairs])))


def _exists(ctx: _Context, path: str) -> bool:
    hit = ctx.exists.get(path)
    if hit is None:
        hit = ctx.exists[path] = os.path.isfile(path)
    return hit


def _counts(cols: dict[str, np.ndarray], sources: list[dict]) -> dict[str, Any]:
    n = int(cols["offsets"].size)
    n_img = cols["n_images"].astype(np.int64)
    prompt = cols["prompt_tokens"].astype(np.int64)
    longest = prompt + np.maximum(cols["chosen_tokens"], cols["rejected_tokens"]).astype(np.int64)
    shared = prompt + cols["chosen_tokens"].astype(np.int64) + cols["rejected_tokens"].astype(np.int64)
    formats: dict[str, int] = {}
    for s in sources:
        for k, v in s["formats"].items():
            formats[k] = formats.get(k, 0) + v
    return {
        "pairs": n,
        "rows_kept": int(sum(s["rows_kept"] for s in sources)),
        "rows_read": int(sum(s["rows_read"] for s in sources)),
        "files": len(sources),
        "formats": formats,
        "with_image": int((n_img > 0).sum()),
        "text_only": int((n_img == 0).sum()),
        "images": int(n_img.sum()),
        "prompt_tokens_mean": float(prompt.mean()) if n else 0.0,
        "chosen_tokens_mean": float(cols["chosen_tokens"].mean()) if n else 0.0,
        "rejected_tokens_mean": float(cols["rejected_tokens"].mean()) if n else 0.0,
        "longest_row_max": int(longest.max()) if n else 0,
        "shared_tokens_mean": float(shared.mean()) if n else 0.0,
    }


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
