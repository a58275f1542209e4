"""Parsing the records of an SFT index build in worker processes.

The records are cut into jobs (a range of one file's records each); :func:`parse_range` parses
one job: JSON, the LLaVA checks, image files present, token lengths, and under a dynamic image
layout (tiles or a wrap) the record's visual tokens, with tiles from each image's (width, height)
read from its file header (no decode). Jobs and results are plain numbers, strings and arrays, so they cross
process boundaries cheaply.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice
from typing import Iterable, Iterator

import numpy as np

from vlmforge.arch.tiles import ImageLayout
from vlmforge.data.sft.lengths import LengthModel
from vlmforge.data.sft.records import SFTDataError, llava_to_messages
from vlmforge.files import PathOutsideRootError, resolve_inside
from vlmforge.imagedecode import ImageDecodeError, ImageTooLargeError, header_size
from vlmforge.text.chat import conversation_lengths

EXACT_BATCH = 512  # records per tokenizer batch call for exact lengths


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding its pixels
    (:func:`vlmforge.imagedecode.header_size`); SFTDataError with reason missing_image, bad_image or
    image_too_large, as training's decode would give."""
    try:
        return header_size(path)
    except FileNotFoundError:
        raise SFTDataError(f"image file not found: {path}", "missing_image") from None
    except ImageTooLargeError as e:
        raise SFTDataError(f"{path}: {e}", "image_too_large") from None
    except ImageDecodeError as e:
        raise SFTDataError(f"image does not decode: {path}: {e}", "bad_image") from None


def make_jobs(spans: list[tuple], lm: LengthModel, image_root: str | None, check_images: bool,
              records_per_job: int, *, allow_absolute_paths: bool = False, strict: bool = False,
              layout=None) -> list[dict]:
    """One job per ``records_per_job`` records of a file; ``spans``: (file id, path, offsets, nbytes, lines).

    ``strict``: a job stops at its first bad record (the build then stops too). ``layout``: a
    dynamic :class:`~vlmforge.arch.tiles.ImageLayout` (this file's tile budget applied): the jobs count
    the records' visual tokens (under tiling from every image's header)."""
    jobs = []
    for fid, path, offs, nb, ln in spans:
        for a in range(0, offs.size, records_per_job):
            b = min(a + records_per_job, offs.size)
            jobs.append(
                {
                    "fid": fid,
                    "path": path,
                    "offsets": offs[a:b],
                    "nbytes": nb[a:b],
                    "lines": ln[a:b],
                    "length_model": lm.describe(),
                    "image_root": str(image_root) if image_root is not None else "",
                    "check_images": check_images,
                    "allow_absolute_paths": allow_absolute_paths,
                    "strict": strict,
                    "layout": layout.record() if layout is not None else None,
                }
            )
    return jobs


def parse_jobs(jobs: Iterable[dict], workers: int) -> Iterator[tuple[dict, dict]]:
    """(job, result) in job order, parsed by ``workers`` processes (in this one if 1 or one job).

    At most ``2 * workers`` jobs are in flight, and those not started are cancelled when the caller
    stops early (strict mode), so a stop does not wait for the rest of the files to be parsed.
    """
    it = iter(jobs)
    head = list(islice(it, 2)) if workers > 1 else []  # a single job is parsed here, without a pool
    if workers <= 1 or len(head) < 2:
        for job in chain(head, it):
            yield job, parse_range(job)
        return
    with ProcessPoolExecutor(max_workers=workers) as ex:
        pending: deque = deque()
        try:
            for job in chain(head, it):
                pending.append((job, ex.submit(parse_range, job)))
                if len(pending) >= 2 * workers:
                    done, fut = pending.popleft()
                    yield done, fut.result()
            while pending:
                done, fut = pending.popleft()
                yield done, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def parse_range(job: dict) -> dict:
    """Parse records [a, b) of one source file; returns per-record arrays and the bad ones.

    Runs in worker processes; everything it gets and returns is plain numbers, strings and arrays.
    """
    path, offs, nbytes = job["path"], job["offsets"], job["nbytes"]
    lm = LengthModel(**job["length_model"])
    image_root = job["image_root"] or None
    check_images = job["check_images"]
    allow_absolute = bool(job.get("allow_absolute_paths", False))
    strict = bool(job.get("strict", False))
    layout = ImageLayout.from_record(job["layout"]) if job.get("layout") else None
    n = offs.size
    ok = np.zeros(n, bool)
    n_img = np.zeros(n, np.uint16)
    text_tok = np.zeros(n, np.uint32)
    visual = np.zeros(n, np.uint32)
    # tiles of each image whose size was read, and its record (local index): the manifest's statistics
    image_tiles: list[int] = []
    image_of: list[int] = []
    bad: list[tuple[int, str, str]] = []  # (local index, reason, message)

    def result() -> dict:
        return {"ok": ok, "n_images": n_img, "text_tokens": text_tok, "visual_tokens": visual,
                "image_tiles": np.asarray(image_tiles, np.uint32), "image_of": np.asarray(image_of, np.int64),
                "bad": bad}

    if n == 0:
        return result()
    lo, hi = int(offs[0]), int(offs[-1] + nbytes[-1])
    with open(path, "rb") as f:
        f.seek(lo)
        buf = f.read(hi - lo)
    exists_cache: dict[str, bool] = {}
    size_cache: dict[str, tuple[int, int] | SFTDataError] = {}
    dir_cache: dict[str, str] = {}
    pending: list[tuple[int, list[dict]]] = []
    for i in range(n):
        if strict and bad:  # strict: stop at the first bad record (after counting the ones before it)
            break
        s = int(offs[i]) - lo
        raw = buf[s : s + int(nbytes[i])]
        if not raw.strip():
            bad.append((i, "blank", "blank line"))
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:
            bad.append((i, "json_error", f"JSON does not parse: {e}"))
            continue
        try:
            msgs, images = llava_to_messages(rec)
        except SFTDataError as e:
            bad.append((i, e.reason, str(e)))
            continue
        try:  # every image path stays inside the image root (symlinks resolved), unless opted out
            resolved = [str(resolve_inside(image_root, im, allow_absolute=allow_absolute, dir_cache=dir_cache))
                        for im in images]
        except PathOutsideRootError as e:
            bad.append((i, e.reason, str(e)))
            continue
        if check_images and images:
            missing = None
            for p in resolved:
                if p not in exists_cache:
                    exists_cache[p] = os.path.isfile(p)
                if not exists_cache[p]:
                    missing = p
                    break
            if missing is not None:
                bad.append((i, "missing_image", f"image file not found: {missing}"))
                continue
        if len(images) > 65535:
            bad.append((i, "too_many_images", f"{len(images)} images"))
            continue
        if layout is not None and images:
            if layout.needs_sizes:
                sizes = [_cached_size(p, size_cache) for p in resolved]
                err = next((s for s in sizes if isinstance(s, SFTDataError)), None)
                if err is not None:
                    bad.append((i, err.reason, str(err)))
                    continue
            else:  # a wrap alone: every image costs the same, whatever its size (no header read)
                sizes = [(1, 1)] * len(images)
            tiles = layout.tiles(sizes)
            visual[i] = min(sum(layout.visual_tokens(sizes)), 2**32 - 1)
            image_tiles.extend(tiles)
            image_of.extend([i] * len(tiles))
        if lm.mode == "exact":
            pending.append((i, msgs))
            n_img[i] = len(images)
            if len(pending) >= EXACT_BATCH:
                _count_exact(lm, pending, ok, text_tok, bad)
            continue
        ok[i] = True
        n_img[i] = len(images)
        text_tok[i] = min(lm.estimate(msgs), 2**32 - 1)
    _count_exact(lm, pending, ok, text_tok, bad)
    bad.sort(key=lambda b: b[0])
    if strict and bad:  # the first bad record in file order (a tokenizer error may precede a parse error)
        bad = bad[:1]
    return result()


def _cached_size(path: str, cache: dict) -> tuple[int, int] | SFTDataError:
    """:func:`image_size` once per path (records share images); the error itself is cached too."""
    if path not in cache:
        try:
            cache[path] = image_size(path)
        except SFTDataError as e:
            cache[path] = e
    return cache[path]


def _count_exact(lm: LengthModel, pending: list, ok, text_tok, bad) -> None:
    """Exact token counts for a batch of parsed records (one Rust batch call); a record the
    tokenizer/template rejects is counted as bad, never fatal."""
    if not pending:
        return
    try:
        counts = conversation_lengths(lm.tok(), [m for _, m in pending])
    except Exception:  # find the culprit(s) one by one
        counts = []
        for i, m in pending:
            try:
                counts.append(conversation_lengths(lm.tok(), [m])[0])
            except Exception as e:
                bad.append((i, "tokenize_error", f"{type(e).__name__}: {e}"))
                counts.append(None)
    for (i, _), c in zip(pending, counts):
        if c is not None:
            ok[i] = True
            text_tok[i] = min(c, 2**32 - 1)
    pending.clear()
