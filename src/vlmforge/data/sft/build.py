"""Build an SFT index (``vlmforge sft-index`` runs this): scan, parse and measure the records once.

Steps: scan each file for its records' byte spans (:mod:`.scan`), calibrate estimated lengths on
the first records, parse the records in jobs (:mod:`.parallel`), then write the kept records'
columns as ``.npy`` arrays and ``manifest.json`` (the format: :mod:`.index`). Bad records (JSON
that does not parse, a record without conversations, ``<image>`` markers that do not match the
images, a missing image file) are skipped and counted per reason in the manifest with file:line
for the first few, or raise :class:`SFTDataError` in strict mode.
"""

from __future__ import annotations

import json
import os
from contextlib import closing
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from vlmforge.config.recipe import Recipe
from vlmforge.data.sft.index import ARRAYS, INDEX_VERSION
from vlmforge.data.sft.lengths import LengthModel
from vlmforge.data.sft.parallel import make_jobs, parse_jobs
from vlmforge.data.sft.records import SFTDataError, llava_to_messages
from vlmforge.data.sft.scan import scan_records
from vlmforge.files import file_stamp, note_example, write_manifest
from vlmforge.text.tokenization import load_tokenizer, tokenizer_fingerprint


def build_index(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    visual_tokens: int,
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

    ``lengths``: ``exact`` (needs ``tokenizer``) or ``estimate`` (calibrated on the first records
    when ``tokenizer`` is given). ``visual_tokens``: tokens each image becomes
    (``vlmforge.arch.geometry.visual_tokens_per_image``). ``config``: the recipe, recorded in the
    manifest. Returns the manifest dict.

    Image paths must stay inside ``image_root`` (symlinks resolved; counted as ``path_outside_root``
    otherwise); ``allow_absolute_paths`` accepts absolute ones. ``strict``: stop at the first bad
    record, reading no further (files are scanned one by one, each job stops at its first bad record).
    """
    if lengths not in ("exact", "estimate"):
        raise ValueError(f"lengths must be 'exact' or 'estimate', got {lengths!r}")
    if lengths == "exact" and tokenizer is None:
        raise ValueError("exact lengths need a tokenizer (or use lengths='estimate')")
    if visual_tokens < 1:
        raise ValueError(f"visual_tokens must be >= 1, got {visual_tokens}")
    sources = [str(s) for s in sources]
    if not sources:
        raise ValueError("no SFT source files given")
    if len(sources) > 65535:
        raise ValueError("at most 65535 source files per index")
    check_images = bool(check_images and image_root is not None)
    lm = LengthModel(mode=lengths, tokenizer=str(tokenizer) if tokenizer else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Strict mode scans each file only when its turn comes, so a bad record stops the build early.
    spans: list = [None] * len(sources)

    def span(fid: int):
        if spans[fid] is None:
            spans[fid] = _scan(fid, sources[fid])
        return spans[fid]

    if not strict:
        for fid in range(len(sources)):
            span(fid)
    if tokenizer is not None and lengths == "estimate" and calibration_records:
        lm.calibrate(_first_messages((span(fid) for fid in range(len(sources))), calibration_records))

    jobs: list[dict] = []

    def job_stream():
        for fid in range(len(sources)):
            for job in make_jobs([span(fid)], lm, image_root, check_images, records_per_job,
                                 allow_absolute_paths=allow_absolute_paths, strict=strict):
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

    cols = _columns(jobs, results, visual_tokens)
    for name, dtype in ARRAYS.items():
        _save_npy(out / f"{name}.npy", np.ascontiguousarray(cols[name], dtype=dtype))
    dropped, examples = _dropped(jobs, results)
    # train refuses a different tokenizer (None: the lengths were estimated without one)
    fingerprint = tokenizer_fingerprint(load_tokenizer(tokenizer)) if tokenizer is not None else None
    manifest = write_manifest(
        out,
        "sft-index",
        inputs=[file_stamp(p) for p in sources],
        config=config,
        counts=_counts(cols, total),
        dropped=dropped,
        dropped_examples=examples,
        index_version=INDEX_VERSION,
        image_root=str(Path(image_root).resolve()) if image_root is not None else None,
        images_checked=check_images,
        allow_absolute_paths=bool(allow_absolute_paths),
        visual_tokens=int(visual_tokens),
        lengths=lm.describe(),
        tokenizer=str(tokenizer) if tokenizer is not None else None,
        tokenizer_fingerprint=fingerprint,
        arrays=list(ARRAYS),
    )
    return json.loads(manifest.read_text())


def _scan(fid: int, path: str) -> tuple[int, str, np.ndarray, np.ndarray, np.ndarray]:
    offs, nb, ln = scan_records(path)
    if nb.size and int(nb.max()) >= 2**32:
        raise SFTDataError(f"{path}: a record is larger than 4 GiB")
    return fid, path, offs, nb, ln


def _columns(jobs: list[dict], results: list[dict], visual_tokens: int) -> dict[str, np.ndarray]:
    """The kept records' columns (every name of ARRAYS), in source order."""

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
    }
    cols = {k: v[keep] for k, v in cols.items()}
    cols["has_image"] = cols["n_images"] > 0
    mm = cols["text_tokens"].astype(np.int64) + cols["n_images"].astype(np.int64) * (visual_tokens - 1)
    cols["mm_length"] = np.minimum(mm, 2**32 - 1)
    return cols


def _counts(cols: dict[str, np.ndarray], scanned: int) -> dict[str, Any]:
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
