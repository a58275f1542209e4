"""Build an SFT index (``vlmforge sft-index`` runs this): scan, parse and measure the records once.

Steps: expand the inputs (a file of records, or an InternVL meta file: named sources, each with
its own image root, ``repeat_time``, ``data_augment``, ``max_dynamic_patch``; :mod:`.meta`), scan
each file for its records' byte spans (:mod:`.scan`; a ``repeat_time`` below 1 keeps the first
rows), calibrate estimated lengths on the first records, parse the records in jobs
(:mod:`.parallel`), repeat the kept records of sources with ``repeat_time`` above 1, then write the
columns as ``.npy`` arrays and ``manifest.json`` (the format: :mod:`.index`). Bad records (JSON
that does not parse, a record without conversations, ``<image>`` markers that do not match the
images, a missing image file) are skipped and counted per reason in the manifest, overall and per
source, with file:line for the first few, or raise :class:`SFTDataError` in strict mode.

Under a dynamic image layout (``model.images.tiles`` or a start/end wrap, :func:`build_index`'s
``layout``) the jobs read each image's (width, height) from its header and count its tiles and
placeholders with the layout (a meta source's ``max_dynamic_patch`` as its tile budget); the
index then holds ``visual_tokens`` per record and the manifest the layout and tile statistics.
An image whose header does not read is a bad record (``bad_image``, ``missing_image``, ...).
"""

from __future__ import annotations

import json
import os
from contextlib import closing
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from vlmforge.arch.tiles import ImageLayout
from vlmforge.config.recipe import Recipe
from vlmforge.data.sft.index import ARRAYS, INDEX_VERSION, LAYOUT_ARRAYS
from vlmforge.data.sft.lengths import LengthModel
from vlmforge.data.sft.meta import SourceFile, meta_sources, read_meta, repeated, rows_read
from vlmforge.data.sft.parallel import make_jobs, parse_jobs
from vlmforge.data.sft.records import SFTDataError, llava_to_messages
from vlmforge.data.sft.scan import scan_records
from vlmforge.errors import UserError
from vlmforge.files import file_stamp, note_example, write_manifest
from vlmforge.text.tokenization import load_tokenizer, tokenizer_fingerprint


def expand_sources(inputs: Sequence[str | os.PathLike], image_root: str | os.PathLike | None) -> list[SourceFile]:
    """Input files -> the record files to index: a meta file gives its sources (their own roots and
    options); any other file is records whose image paths are relative to ``image_root``."""
    out: list[SourceFile] = []
    for p in map(str, inputs):
        if not os.path.isfile(p):
            raise SFTDataError(f"SFT file not found: {p}")
        meta = read_meta(p)
        if meta is not None:
            out.extend(meta_sources(p, meta))
        else:
            out.append(SourceFile(p, str(image_root) if image_root is not None else None))
    if len(out) > 65535:
        raise UserError("at most 65535 source files per index")
    return out


def build_index(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    visual_tokens: int | None = None,
    layout: ImageLayout | None = None,
    image_root: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    lengths: str = "exact",
    check_images: bool = True,
    strict: bool = False,
    allow_absolute_paths: bool = False,
    workers: int = 1,
    records_per_job: int = 50_000,
    calibration_records: int = 512,
    progress: bool = True,
    config: Recipe | None = None,
) -> dict:
    """Scan and parse SFT files once; write the ``.npy`` arrays and ``manifest.json`` to ``out_dir``.

    ``sources``: LLaVA ``.json`` / ``.jsonl`` files and InternVL meta files (detected by content).
    ``lengths``: ``exact`` (needs ``tokenizer``) or ``estimate`` (calibrated on the first records
    when ``tokenizer`` is given). ``visual_tokens``: tokens each image becomes
    (``vlmforge.arch.geometry.visual_tokens_per_image``); or ``layout``
    (``vlmforge.arch.geometry.image_layout``): with tiles or a wrap, each record's visual tokens
    are counted from its images' sizes (headers read, not decoded). ``config``: the recipe, recorded
    in the manifest (its ``model.images.start`` / ``end`` name the wrap). Returns the manifest dict.

    Image paths must stay inside their root (``image_root`` for record files, a meta entry's
    ``root`` for its annotation; symlinks resolved; counted as ``path_outside_root`` otherwise);
    ``allow_absolute_paths`` accepts absolute ones. ``strict``: stop at the first bad record,
    reading no further (files are scanned one by one, each job stops at its first bad record).
    """
    if lengths not in ("exact", "estimate"):
        raise ValueError(f"lengths must be 'exact' or 'estimate', got {lengths!r}")
    if lengths == "exact" and tokenizer is None:
        raise ValueError("exact lengths need a tokenizer (or use lengths='estimate')")
    if layout is None:
        if visual_tokens is None:
            raise ValueError("pass visual_tokens (tokens per image) or layout")
        layout = ImageLayout(int(visual_tokens))
    elif visual_tokens is not None and int(visual_tokens) != layout.tokens_per_tile:
        raise ValueError(f"visual_tokens={visual_tokens} but the layout has {layout.tokens_per_tile} tokens per tile")
    visual_tokens = layout.tokens_per_tile
    if visual_tokens < 1:
        raise ValueError(f"visual_tokens must be >= 1, got {visual_tokens}")
    dynamic = layout is not None and layout.dynamic
    inputs = [str(s) for s in sources]
    if not inputs:
        raise ValueError("no SFT source files given")
    files = expand_sources(inputs, image_root)
    lm = LengthModel(mode=lengths, tokenizer=str(tokenizer) if tokenizer else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Strict mode scans each file only when its turn comes, so a bad record stops the build early.
    spans: list = [None] * len(files)
    rows = [0] * len(files)  # records in each file, before a repeat_time below 1 cuts them

    def span(fid: int):
        if spans[fid] is None:
            fid_, path, offs, nb, ln = _scan(fid, files[fid].path)
            rows[fid] = int(offs.size)
            n = rows_read(rows[fid], files[fid].repeat_time)
            spans[fid] = (fid_, path, offs[:n], nb[:n], ln[:n])
        return spans[fid]

    if not strict:
        for fid in range(len(files)):
            span(fid)
    if tokenizer is not None and lengths == "estimate" and calibration_records:
        lm.calibrate(_first_messages((span(fid) for fid in range(len(files))), calibration_records))

    jobs: list[dict] = []

    def job_stream():
        for fid, src in enumerate(files):
            root = src.image_root
            # a source's max_dynamic_patch is its tile budget (a no-op without tiles)
            mine = layout.with_max_tiles(src.max_dynamic_patch) if dynamic else None
            for job in make_jobs([span(fid)], lm, root, bool(check_images and root is not None), records_per_job,
                                 allow_absolute_paths=allow_absolute_paths, strict=strict, layout=mine):
                jobs.append(job)
                yield job

    total = None if strict else sum(s[2].size for s in spans)
    results: list[dict] = []
    with tqdm(total=total, desc="sft-index", unit="rec", disable=not progress) as bar, \
            closing(parse_jobs(job_stream(), workers)) as parsed:
        for job, res in parsed:
            results.append(res)
            bar.update(job["offsets"].size)
            _check_strict(strict, job, res)
    scanned = sum(s[2].size for s in spans)

    cols = _repeat(_columns(jobs, results, visual_tokens, dynamic), files)
    arrays = {**ARRAYS, **(LAYOUT_ARRAYS if dynamic else {})}
    for name, dtype in arrays.items():
        _save_npy(out / f"{name}.npy", np.ascontiguousarray(cols[name], dtype=dtype))
    dropped, examples = _dropped(jobs, results)
    # train refuses a different tokenizer (None: the lengths were estimated without one)
    fingerprint = tokenizer_fingerprint(load_tokenizer(tokenizer)) if tokenizer is not None else None
    meta_files = sorted({f.meta_file for f in files if f.meta_file is not None})
    manifest = write_manifest(
        out,
        "sft-index",
        inputs=[file_stamp(f.path) for f in files],
        config=config,
        counts=_counts(cols, scanned),
        dropped=dropped,
        dropped_examples=examples,
        index_version=INDEX_VERSION,
        image_root=str(Path(image_root).resolve()) if image_root is not None else None,
        images_checked=bool(check_images and image_root is not None),
        allow_absolute_paths=bool(allow_absolute_paths),
        visual_tokens=int(visual_tokens),
        images=layout.record(*_wrap_text(config)),
        tiles=_tile_stats(jobs, results, cols, dynamic),
        lengths=lm.describe(),
        tokenizer=str(tokenizer) if tokenizer is not None else None,
        tokenizer_fingerprint=fingerprint,
        arrays=list(arrays),
        meta_files=[file_stamp(m) for m in meta_files],
        sources=_source_stats(files, rows, spans, jobs, results, cols),
    )
    return json.loads(manifest.read_text())


def _scan(fid: int, path: str) -> tuple[int, str, np.ndarray, np.ndarray, np.ndarray]:
    offs, nb, ln = scan_records(path)
    if nb.size and int(nb.max()) >= 2**32:
        raise SFTDataError(f"{path}: a record is larger than 4 GiB")
    return fid, path, offs, nb, ln


def _wrap_text(config: Recipe | None) -> tuple[str | None, str | None]:
    images = getattr(getattr(config, "model", None), "images", None)
    return (images.start, images.end) if images is not None else (None, None)


def _columns(jobs: list[dict], results: list[dict], visual_tokens: int, dynamic: bool = False) -> dict[str, np.ndarray]:
    """The kept records' columns (every name of ARRAYS, and LAYOUT_ARRAYS when ``dynamic``), in
    source order; ``row`` numbers the kept records (their rows before repeats)."""

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0)

    keep = np.concatenate([r["ok"] for r in results]) if results else np.zeros(0, bool)
    cols = {
        "offsets": cat([j["offsets"] for j in jobs]),
        "nbytes": cat([j["nbytes"] for j in jobs]),
        "file_id": cat([np.full(j["offsets"].size, j["fid"]) for j in jobs]),
        "line": cat([j["lines"] for j in jobs]),
        "n_images": cat([r["n_images"] for r in results]),
        "text_tokens": cat([r["text_tokens"] for r in results]),
        "visual_tokens": cat([r["visual_tokens"] for r in results]),
    }
    cols = {k: v[keep] for k, v in cols.items()}
    cols["has_image"] = cols["n_images"] > 0
    cols["row"] = np.arange(cols["has_image"].size)
    text, n_img = cols["text_tokens"].astype(np.int64), cols["n_images"].astype(np.int64)
    if dynamic:  # contract T1: each one-token marker replaced by its image's wrap + placeholders
        mm = text - n_img + cols["visual_tokens"].astype(np.int64)
    else:
        mm = text + n_img * (visual_tokens - 1)
    cols["mm_length"] = np.minimum(mm, 2**32 - 1)
    return cols


def _tile_stats(jobs: list[dict], results: list[dict], cols: dict[str, np.ndarray], dynamic: bool) -> dict | None:
    """Tiles per image (mean, max, histogram) and visual tokens per record (mean, max) over the
    index's rows (a repeated record counts each time); None on a fixed grid."""
    if not dynamic:
        return None
    kept = [np.flatnonzero(r["ok"]) for r in results]
    # per kept record (its ``row``): how many rows of the index it became
    copies = np.bincount(cols["row"], minlength=sum(k.size for k in kept))
    tiles, weight, base = [], [], 0
    for res, k in zip(results, kept):
        row_of = np.full(res["ok"].size, -1, np.int64)
        row_of[k] = base + np.arange(k.size)
        base += k.size
        rows = row_of[res["image_of"]]
        on = rows >= 0
        tiles.append(res["image_tiles"][on].astype(np.int64))
        weight.append(copies[rows[on]])
    t = np.concatenate(tiles) if tiles else np.zeros(0, np.int64)
    w = np.concatenate(weight) if weight else np.zeros(0, np.int64)
    n_img = int(w.sum())
    vis = cols["visual_tokens"].astype(np.int64)
    hist = np.bincount(t, weights=w).astype(np.int64) if t.size else np.zeros(0, np.int64)
    return {
        "images": n_img,
        "tiles": int((t * w).sum()),
        "per_image_mean": float((t * w).sum() / n_img) if n_img else 0.0,
        "per_image_max": int(t[w > 0].max()) if n_img else 0,
        "per_image_histogram": {str(k): int(v) for k, v in enumerate(hist.tolist()) if v},
        "visual_tokens_mean": float(vis.mean()) if vis.size else 0.0,
        "visual_tokens_max": int(vis.max()) if vis.size else 0,
        "visual_tokens_mean_with_image": float(vis[cols["has_image"]].mean()) if cols["has_image"].any() else 0.0,
    }


def _repeat(cols: dict[str, np.ndarray], files: list[SourceFile]) -> dict[str, np.ndarray]:
    """The columns with each source's kept records repeated as its ``repeat_time`` (> 1) says."""
    if all(f.repeat_time <= 1 for f in files):
        return cols
    order = np.argsort(cols["file_id"], kind="stable")  # already in file order; stable keeps it so
    per_file = np.split(order, np.cumsum(np.bincount(cols["file_id"].astype(np.int64), minlength=len(files)))[:-1])
    sel = np.concatenate([repeated(pos, f.repeat_time) for pos, f in zip(per_file, files)])
    return {k: v[sel] for k, v in cols.items()}


def _source_stats(files: list[SourceFile], rows: list[int], spans: list, jobs: list[dict], results: list[dict],
                  cols: dict[str, np.ndarray]) -> list[dict]:
    """Per source file (``file_id`` order): where it came from, its options, rows in the file / read /
    kept / dropped by reason, and its share of the index's samples and multimodal tokens."""
    n = len(files)
    fid = cols["file_id"].astype(np.int64)
    samples = np.bincount(fid, minlength=n)
    tokens = np.bincount(fid, weights=cols["mm_length"].astype(np.float64), minlength=n)
    kept = np.zeros(n, np.int64)
    dropped: list[dict[str, int]] = [{} for _ in range(n)]
    for job, res in zip(jobs, results):
        kept[job["fid"]] += int(res["ok"].sum())
        for _i, reason, _msg in res["bad"]:
            d = dropped[job["fid"]]
            d[reason] = d.get(reason, 0) + 1
    total_s, total_t = max(1, int(samples.sum())), max(1.0, float(tokens.sum()))
    out = []
    for k, f in enumerate(files):
        out.append({
            **f.describe(),
            "image_root": str(Path(f.image_root).resolve()) if f.image_root is not None else None,
            "data_augment": f.data_augment,
            "max_dynamic_patch": f.max_dynamic_patch,
            "rows": int(rows[k]),
            "rows_read": int(spans[k][2].size) if spans[k] is not None else 0,
            "rows_kept": int(kept[k]),
            "dropped": dict(sorted(dropped[k].items())),
            "samples": int(samples[k]),
            "tokens": int(tokens[k]),
            "share_samples": float(samples[k]) / total_s,
            "share_tokens": float(tokens[k]) / total_t,
        })
    return out


def _counts(cols: dict[str, np.ndarray], scanned: int) -> dict[str, Any]:
    """``records``: rows of the index (a repeated record counts each time); ``scanned``: records read."""
    n = int(cols["has_image"].size)
    mm = cols["mm_length"]
    return {
        "records": n,
        "scanned": int(scanned),
        "with_image": int(cols["has_image"].sum()),
        "text_only": int(n - cols["has_image"].sum()),
        "images": int(cols["n_images"].astype(np.int64).sum()),
        "mm_tokens": int(mm.astype(np.int64).sum()),
        "mm_length_max": int(mm.max()) if n else 0,
        "mm_length_mean": float(mm.mean()) if n else 0.0,
    }


def _dropped(jobs: list[dict], results: list[dict]) -> tuple[dict[str, int], dict[str, list[dict]]]:
    """Skipped records per reason, and file:line examples of the first few per reason."""
    dropped: dict[str, int] = {}
    examples: dict[str, list[dict]] = {}
    for job, res in zip(jobs, results):
        for i, reason, msg in res["bad"]:
            dropped[reason] = dropped.get(reason, 0) + 1
            note_example(examples, reason, {"file": job["path"], "line": int(job["lines"][i]), "error": msg})
    return dropped, examples


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.replace(tmp, path)


def _check_strict(strict: bool, job: dict, res: dict) -> None:
    if strict and res["bad"]:
        i, reason, msg = res["bad"][0]
        raise SFTDataError(f"{job['path']}:{int(job['lines'][i])}: {reason}: {msg}")


def _first_messages(spans, k: int) -> list[list[dict]]:
    out = []
    for _fid, path, offs, nb, _ln in spans:
        with open(path, "rb") as f:
            for o, b in zip(offs[: k * 2].tolist(), nb[: k * 2].tolist()):
                if len(out) >= k:
                    return out
                f.seek(o)
                try:
                    out.append(llava_to_messages(json.loads(f.read(b)))[0])
                except (ValueError, SFTDataError):
                    continue
    return out
