"""On-disk, memory-mapped index over LLaVA-format SFT files (json arrays or jsonl).

A LLaVA record is ``{"image": "a.jpg" | ["a.jpg", ...] (optional), "conversations":
[{"from": "human"|"gpt"|"system", "value": "...<image>..."}]}``. Loading such a file with
``json.load`` needs tens of bytes of Python objects per byte of JSON (MAmmoTH-VL-10M: > 200 GB).
Instead we scan it once and keep, per record, only fixed-width numbers in ``.npy`` files that are
opened with ``mmap_mode="r"``:

- ``offsets`` (uint64) / ``nbytes`` (uint32): where the record's JSON lies in its source file,
- ``file_id`` (uint16) / ``line`` (uint32): which source file and line (for error messages),
- ``n_images`` (uint16) / ``has_image`` (bool),
- ``text_tokens`` (uint32): tokens of the chat-formatted text, each ``<image>`` counted once,
- ``mm_length`` (uint32): ``text_tokens + n_images * (visual_tokens - 1)``, the multimodal length
  the packer and length grouping use.

Lengths are ``exact`` (the tokenizer's chat template, the same call the dataset makes) or
``estimate`` (UTF-8 bytes / bytes-per-token + per-turn overhead; bytes-per-token calibrated on the
first records when a tokenizer is given). Packing plans with ``mm_length``: build the index with
exact lengths for packing (an estimated length can overflow a pack; the loader then moves the
overflowing conversation to an extra row, never splitting it).

Bad records (JSON that does not parse, a record without conversations, ``<image>`` markers that do
not match the images, a missing image file) are skipped and counted per reason in the index's
``manifest.json`` with file:line for the first few, or raise :class:`SFTDataError` in strict mode.
Random access is one ``os.pread`` + ``json.loads`` (:meth:`SFTIndex.record`).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from vlmforge.arch.tokens import IMAGE_TOKEN


ARRAYS = {
    "offsets": np.uint64,
    "nbytes": np.uint32,
    "file_id": np.uint16,
    "line": np.uint32,
    "n_images": np.uint16,
    "has_image": np.bool_,
    "text_tokens": np.uint32,
    "mm_length": np.uint32,
}
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
EXAMPLES_PER_REASON = 5
INDEX_VERSION = 1
_CHUNK = 1 << 24  # 16 MiB of jsonl per newline scan step
_JSON_CHUNK = 1 << 22  # 4 MiB per JSON-array scan step


class SFTDataError(ValueError):
    """A bad SFT record or file; the message names the file and line."""


# ----------------------------------------------------------------------------- records


def record_images(rec: dict) -> list[str]:
    img = rec.get("image", rec.get("images"))
    if img is None or img == "":
        return []
    if isinstance(img, str):
        return [img]
    if isinstance(img, list) and all(isinstance(x, str) for x in img):
        return list(img)
    raise SFTDataError(f"'image' must be a path or a list of paths, got {type(img).__name__}")


def llava_to_messages(rec: Any) -> tuple[list[dict], list[str]]:
    """LLaVA record -> (chat messages ``{"role", "content"}``, image paths).

    Like LLaVA, a record with images but no ``<image>`` marker gets ``<image>\\n`` markers prepended
    to its first user turn. Raises :class:`SFTDataError` (reason in ``.reason``) on a malformed record.
    """
    if not isinstance(rec, dict):
        raise _bad("not_an_object", f"record is a {type(rec).__name__}, not an object")
    conv = rec.get("conversations", rec.get("messages"))
    if not isinstance(conv, list) or not conv:
        raise _bad("no_conversations", "record has no non-empty 'conversations' list")
    try:
        images = record_images(rec)
    except SFTDataError as e:
        raise _bad("bad_image_field", str(e)) from None
    msgs = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise _bad("bad_turn", f"turn {i} is not an object")
        who = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = ROLE_MAP.get(who) if isinstance(who, str) else None
        if role is None or not isinstance(text, str):
            raise _bad("bad_turn", f"turn {i} needs 'from' in human/gpt/system and a string 'value'")
        msgs.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in msgs):
        raise _bad("no_assistant_turn", "record has no gpt/assistant turn (nothing to learn)")
    n_markers = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
    if n_markers == 0 and images:
        first_user = next((m for m in msgs if m["role"] == "user"), None)
        if first_user is None:
            raise _bad("image_token_mismatch", "record has images but no user turn to put them in")
        first_user["content"] = (IMAGE_TOKEN + "\n") * len(images) + first_user["content"]
    elif n_markers != len(images):
        raise _bad("image_token_mismatch", f"{n_markers} {IMAGE_TOKEN} marker(s) for {len(images)} image(s)")
    return msgs, images


def _bad(reason: str, msg: str) -> SFTDataError:
    e = SFTDataError(msg)
    e.reason = reason  # type: ignore[attr-defined]
    return e


# ----------------------------------------------------------------------------- scanning


def _scan_jsonl(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, nbytes, line) of the non-blank lines of a jsonl file, without parsing them."""
    offs, ends = [], []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        base = 0
        while base < size:
            buf = f.read(_CHUNK)
            nl = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10).astype(np.int64) + base
            ends.append(nl)
            base += len(buf)
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if size and (ends.size == 0 or ends[-1] != size - 1):
        ends = np.append(ends, size)  # last line without a trailing newline
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if ends.size else ends
    lines = np.arange(1, ends.size + 1, dtype=np.int64)
    keep = ends - starts > 0
    # Lines that are only whitespace (e.g. "\r") are dropped when parsed; here only empty ones.
    return starts[keep], (ends - starts)[keep], lines[keep]


def _escaped(buf: np.ndarray, qpos: np.ndarray, carry_bs: int) -> np.ndarray:
    """Which quotes at ``qpos`` are escaped (preceded by an odd run of backslashes).

    Backslashes before quotes are rare, so only those quotes are walked back, all at once.
    ``carry_bs``: backslashes that ended the previous chunk.
    """
    esc = np.zeros(qpos.size, bool)
    cand = np.flatnonzero((qpos == 0) | (buf[np.maximum(qpos - 1, 0)] == 92))
    if not cand.size:
        return esc
    pos = qpos[cand]
    run = np.zeros(pos.size, np.int64)
    active = np.ones(pos.size, bool)
    step = 1
    while active.any():
        at = pos - step
        inside = at >= 0
        hit = active & inside & (buf[np.maximum(at, 0)] == 92)
        run += hit
        reached_start = active & ~inside  # the run goes back into the previous chunk
        run[reached_start] += carry_bs
        active = hit
        step += 1
    esc[cand] = run % 2 == 1
    return esc


def _scan_json_array(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, nbytes, line) of the top-level objects of a JSON array, by a vectorised scan.

    Per 4 MiB chunk, only the structural bytes (``"{}[]``) are kept as events: unescaped quotes
    toggle an in-string flag; outside strings ``{[`` / ``}]`` move the depth. An object starts where
    a ``{`` brings the depth from 1 to 2 and ends where a ``}`` brings it back to 1. In-string
    parity, depth and a trailing backslash run carry over between chunks.
    """
    size = os.path.getsize(path)
    starts, ends, lines = [], [], []
    in_str, depth, bs_run, base, newlines, seen_open = 0, 0, 0, 0, 0, False
    with open(path, "rb") as f:
        while base < size:
            buf = np.frombuffer(f.read(_JSON_CHUNK), np.uint8)
            n = buf.size
            if not seen_open:
                first = np.flatnonzero(~np.isin(buf, (32, 9, 10, 13, 0xEF, 0xBB, 0xBF)))
                if first.size:
                    if buf[first[0]] != 91:
                        raise SFTDataError(f"{path}: a .json SFT file must be a JSON array of records ('[' first)")
                    seen_open = True
            ev = np.flatnonzero((buf == 34) | (buf == 123) | (buf == 125) | (buf == 91) | (buf == 93))
            c = buf[ev]
            quote = c == 34
            qi = np.flatnonzero(quote)
            quote[qi[_escaped(buf, ev[qi], bs_run)]] = False
            q_cum = np.cumsum(quote) + in_str  # parity after each event
            outside = ((q_cum - quote) % 2 == 0) & ~quote
            opens = outside & ((c == 123) | (c == 91))
            closes = outside & ((c == 125) | (c == 93))
            d_after = np.cumsum(opens.astype(np.int64) - closes) + depth
            s_local = ev[opens & (c == 123) & (d_after == 2)]
            e_local = ev[closes & (c == 125) & (d_after == 1)]
            nl = np.flatnonzero(buf == 10)
            starts.append(s_local + base)
            ends.append(e_local + base)
            lines.append(np.searchsorted(nl, s_local) + newlines + 1)
            newlines += nl.size
            if ev.size:
                in_str = int(q_cum[-1] % 2)
                depth = int(d_after[-1])
            k = 0
            while k < n and buf[n - 1 - k] == 92:
                k += 1
            bs_run = bs_run + n if k == n else k
            base += n
    s = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    e = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if s.size != e.size or (s.size and np.any(e < s)):
        raise SFTDataError(
            f"{path}: unbalanced JSON array ({s.size} objects opened, {e.size} closed): the file is truncated or corrupt"
        )
    ln = np.concatenate(lines) if lines else np.zeros(0, np.int64)
    return s, e - s + 1, ln


def scan_records(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte spans of the records of one file (``.json`` array or ``.jsonl``), without parsing."""
    if not os.path.isfile(path):
        raise SFTDataError(f"SFT file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    # By content, not extension: some datasets ship one-record-per-line files named .json.
    if head.startswith(b"["):
        return _scan_json_array(path)
    return _scan_jsonl(path)


# ----------------------------------------------------------------------------- lengths

_TOKENIZERS: dict[str, Any] = {}


@dataclass
class LengthModel:
    """How text token lengths are measured: ``exact`` (tokenizer folder) or ``estimate``."""

    mode: str = "estimate"
    tokenizer: str | None = None
    bytes_per_token: float = 4.0
    turn_overhead: int = 5  # <|im_start|> role \n ... <|im_end|> \n
    conversation_overhead: int = 10  # the default system prompt of a Qwen-shaped template
    _tok: Any = field(default=None, repr=False)

    def tok(self):
        if self._tok is None:
            from vlmforge.text.tokenization import load_tokenizer

            if self.tokenizer not in _TOKENIZERS:  # once per process, not once per job
                _TOKENIZERS[self.tokenizer] = load_tokenizer(self.tokenizer)
            self._tok = _TOKENIZERS[self.tokenizer]
        return self._tok

    def exact(self, msgs: list[dict]) -> int:
        from vlmforge.text.tokenization import encode_conversation

        return len(encode_conversation(self.tok(), msgs)[0])

    def estimate(self, msgs: list[dict]) -> int:
        nbytes = sum(len(m["content"].encode("utf-8")) - 6 * m["content"].count(IMAGE_TOKEN) for m in msgs)
        has_sys = msgs[0]["role"] == "system"
        return (
            math.ceil(nbytes / self.bytes_per_token)
            + self.turn_overhead * len(msgs)
            + (0 if has_sys else self.conversation_overhead)
        )

    def __call__(self, msgs: list[dict]) -> int:
        return self.exact(msgs) if self.mode == "exact" else self.estimate(msgs)

    def calibrate(self, samples: list[list[dict]]) -> None:
        """Fit bytes-per-token and the fixed overheads on exact counts (least squares, 2 params)."""
        if not samples:
            return
        tok = self.tok()
        from vlmforge.text.tokenization import encode_conversation

        sys_len = len(encode_conversation(tok, [{"role": "assistant", "content": ""}])[0])
        one_turn = len(
            encode_conversation(tok, [{"role": "system", "content": ""}, {"role": "assistant", "content": ""}])[0]
        )
        self.turn_overhead = max(1, one_turn // 2)
        self.conversation_overhead = max(0, sys_len - self.turn_overhead)
        x, y = [], []
        for msgs in samples:
            fixed = self.turn_overhead * len(msgs) + (0 if msgs[0]["role"] == "system" else self.conversation_overhead)
            nbytes = sum(len(m["content"].encode("utf-8")) - 6 * m["content"].count(IMAGE_TOKEN) for m in msgs)
            x.append(nbytes)
            y.append(max(1, self.exact(msgs) - fixed))
        self.bytes_per_token = max(1.0, float(sum(x)) / float(sum(y)))

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "tokenizer": self.tokenizer,
            "bytes_per_token": self.bytes_per_token,
            "turn_overhead": self.turn_overhead,
            "conversation_overhead": self.conversation_overhead,
        }


# ----------------------------------------------------------------------------- parsing (workers)


def _parse_range(job: dict) -> dict:
    """Parse records [a, b) of one source file; returns per-record arrays and the bad ones.

    Runs in worker processes; everything it gets and returns is plain numbers, strings and arrays.
    """
    path, offs, nbytes, lines = job["path"], job["offsets"], job["nbytes"], job["lines"]
    lm = LengthModel(**job["length_model"])
    image_root = job["image_root"]
    check_images = job["check_images"]
    n = offs.size
    ok = np.zeros(n, bool)
    n_img = np.zeros(n, np.uint16)
    text_tok = np.zeros(n, np.uint32)
    bad: list[tuple[int, str, str]] = []  # (local index, reason, message)
    if n == 0:
        return {"ok": ok, "n_images": n_img, "text_tokens": text_tok, "bad": bad}
    lo, hi = int(offs[0]), int(offs[-1] + nbytes[-1])
    with open(path, "rb") as f:
        f.seek(lo)
        buf = f.read(hi - lo)
    exists_cache: dict[str, bool] = {}
    pending: list[tuple[int, list[dict]]] = []
    for i in range(n):
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
            bad.append((i, getattr(e, "reason", "bad_record"), str(e)))
            continue
        if check_images and images:
            missing = None
            for im in images:
                p = os.path.join(image_root, im)
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
        if lm.mode == "exact":
            pending.append((i, msgs))
            n_img[i] = len(images)
            if len(pending) >= 512:
                _count_exact(lm, pending, ok, text_tok, bad)
            continue
        ok[i] = True
        n_img[i] = len(images)
        text_tok[i] = min(lm.estimate(msgs), 2**32 - 1)
    _count_exact(lm, pending, ok, text_tok, bad)
    bad.sort(key=lambda b: b[0])
    return {"ok": ok, "n_images": n_img, "text_tokens": text_tok, "bad": bad}


def _count_exact(lm: "LengthModel", pending: list, ok, text_tok, bad) -> None:
    """Exact token counts for a batch of parsed records (one Rust batch call); a record the
    tokenizer/template rejects is counted as bad, never fatal."""
    if not pending:
        return
    from vlmforge.text.tokenization import conversation_lengths

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


# ----------------------------------------------------------------------------- build


def _source_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


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
    workers: int = 1,
    records_per_job: int = 50_000,
    calibration_records: int = 512,
    progress: bool = True,
    config: Any = None,
) -> dict:
    """Scan and parse SFT files once; write the ``.npy`` arrays and ``manifest.json`` to ``out_dir``.

    ``lengths``: ``exact`` (needs ``tokenizer``) or ``estimate`` (calibrated on the first records
    when ``tokenizer`` is given). ``visual_tokens``: tokens each image becomes
    (``vlmforge.arch.geometry.visual_tokens_per_image``). Returns the manifest dict.
    """
    from tqdm import tqdm

    from vlmforge.files import write_manifest

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

    spans = []
    for fid, path in enumerate(sources):
        offs, nb, ln = scan_records(path)
        if nb.size and int(nb.max()) >= 2**32:
            raise SFTDataError(f"{path}: a record is larger than 4 GiB")
        spans.append((fid, path, offs, nb, ln))

    if tokenizer is not None and lengths == "estimate" and calibration_records:
        lm.calibrate(_first_messages(spans, calibration_records))

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
                    "length_model": {k: v for k, v in lm.describe().items()},
                    "image_root": str(image_root) if image_root is not None else "",
                    "check_images": check_images,
                }
            )
    total = sum(s[2].size for s in spans)
    results: list[dict] = []
    bar = tqdm(total=total, desc="sft-index", unit="rec", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            for job, res in zip(jobs, ex.map(_parse_range, jobs)):
                results.append(res)
                bar.update(job["offsets"].size)
                _check_strict(strict, job, res)
    else:
        for job in jobs:
            res = _parse_range(job)
            results.append(res)
            bar.update(job["offsets"].size)
            _check_strict(strict, job, res)
    bar.close()

    keep = np.concatenate([r["ok"] for r in results]) if results else np.zeros(0, bool)
    cols = {
        "offsets": np.concatenate([j["offsets"] for j in jobs]) if jobs else np.zeros(0),
        "nbytes": np.concatenate([j["nbytes"] for j in jobs]) if jobs else np.zeros(0),
        "file_id": np.concatenate([np.full(j["offsets"].size, j["fid"]) for j in jobs]) if jobs else np.zeros(0),
        "line": np.concatenate([j["lines"] for j in jobs]) if jobs else np.zeros(0),
        "n_images": np.concatenate([r["n_images"] for r in results]) if results else np.zeros(0),
        "text_tokens": np.concatenate([r["text_tokens"] for r in results]) if results else np.zeros(0),
    }
    cols = {k: v[keep] for k, v in cols.items()}
    cols["has_image"] = cols["n_images"] > 0
    mm = cols["text_tokens"].astype(np.int64) + cols["n_images"].astype(np.int64) * (visual_tokens - 1)
    cols["mm_length"] = np.minimum(mm, 2**32 - 1)
    for name, dtype in ARRAYS.items():
        _save_npy(out / f"{name}.npy", np.ascontiguousarray(cols[name], dtype=dtype))

    dropped: dict[str, int] = {}
    examples: dict[str, list[dict]] = {}
    for job, res in zip(jobs, results):
        for i, reason, msg in res["bad"]:
            dropped[reason] = dropped.get(reason, 0) + 1
            ex = examples.setdefault(reason, [])
            if len(ex) < EXAMPLES_PER_REASON:
                ex.append({"file": job["path"], "line": int(job["lines"][i]), "error": msg})
    n = int(keep.sum())
    mm_arr = cols["mm_length"]
    manifest = write_manifest(
        out,
        "sft-index",
        inputs=[_source_stamp(p) for p in sources],
        config=config,
        counts={
            "records": n,
            "scanned": int(total),
            "with_image": int(cols["has_image"].sum()),
            "text_only": int(n - cols["has_image"].sum()),
            "images": int(cols["n_images"].astype(np.int64).sum()),
            "mm_tokens": int(mm_arr.astype(np.int64).sum()),
            "mm_length_max": int(mm_arr.max()) if n else 0,
            "mm_length_mean": float(mm_arr.mean()) if n else 0.0,
        },
        dropped=dropped,
        dropped_examples=examples,
        index_version=INDEX_VERSION,
        image_root=str(Path(image_root).resolve()) if image_root is not None else None,
        images_checked=check_images,
        visual_tokens=int(visual_tokens),
        lengths=lm.describe(),
        arrays=list(ARRAYS),
    )
    return json.loads(manifest.read_text())


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


# ----------------------------------------------------------------------------- open / read


class SFTIndex:
    """An opened index: memory-mapped arrays + open source files; ``record(i)`` reads one record.

    Holding it costs a few file descriptors and the pages of the arrays that were touched
    (at most ~27 bytes per record), not the JSON.
    """

    def __init__(self, index_dir: str | os.PathLike, check_stale: bool = True):
        self.dir = Path(index_dir)
        man_path = self.dir / "manifest.json"
        if not man_path.is_file():
            raise SFTDataError(f"{self.dir}: not an SFT index (no manifest.json); build it with `vlmforge sft-index`")
        self.manifest = json.loads(man_path.read_text())
        if self.manifest.get("stage") != "sft-index":
            raise SFTDataError(f"{man_path}: not an SFT index manifest (stage {self.manifest.get('stage')!r})")
        self.sources = [s["path"] for s in self.manifest["inputs"]]
        if check_stale:
            for s in self.manifest["inputs"]:
                try:
                    st = os.stat(s["path"])
                except FileNotFoundError:
                    raise SFTDataError(f"{self.dir}: source file {s['path']} is gone") from None
                if st.st_size != s["size"] or st.st_mtime_ns != s["mtime_ns"]:
                    raise SFTDataError(
                        f"{self.dir}: index is stale: {s['path']} changed since it was indexed; rebuild it"
                    )
        for name in ARRAYS:
            # A plain ndarray view of the memory map: same pages, but scalar indexing skips
            # np.memmap's Python-level __getitem__ (a few microseconds per record read).
            arr = np.load(self.dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            setattr(self, name, arr.view(np.ndarray))
        self.visual_tokens = int(self.manifest["visual_tokens"])
        self.image_root = self.manifest.get("image_root")
        self._fds: list[int | None] = [None] * len(self.sources)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __getstate__(self):  # pragma: no cover - DataLoader workers re-open files themselves
        d = dict(self.__dict__)
        d["_fds"] = [None] * len(self.sources)
        return d

    def _fd(self, fid: int) -> int:
        if self._pid != os.getpid():  # forked worker: do not share file offsets/descriptors
            self._fds = [None] * len(self.sources)
            self._pid = os.getpid()
        fd = self._fds[fid]
        if fd is None:
            fd = self._fds[fid] = os.open(self.sources[fid], os.O_RDONLY)
        return fd

    def raw(self, i: int) -> bytes:
        """The JSON bytes of record ``i`` (IndexError when out of range)."""
        fd = self._fds[self.file_id[i]] if self._pid == os.getpid() else None
        if fd is None:
            fd = self._fd(int(self.file_id[i]))
        return os.pread(fd, int(self.nbytes[i]), int(self.offsets[i]))

    def record(self, i: int) -> dict:
        """The parsed JSON record ``i`` (as ``json.loads`` of its bytes)."""
        try:
            return json.loads(self.raw(i))
        except ValueError as e:
            raise _bad("json_error", f"{self.where(i)}: JSON does not parse: {e}") from None

    def messages(self, i: int) -> tuple[list[dict], list[str]]:
        rec = self.record(i)
        try:
            return llava_to_messages(rec)
        except SFTDataError as e:
            raise _bad(getattr(e, "reason", "bad_record"), f"{self.where(i)}: {e}") from None

    def where(self, i: int) -> str:
        return f"{self.sources[int(self.file_id[i])]}:{int(self.line[i])}"

    def mm_lengths(self, visual_tokens: int | None = None) -> np.ndarray:
        """Multimodal lengths; recomputed (in memory) when ``visual_tokens`` differs from the build's."""
        if visual_tokens is None or visual_tokens == self.visual_tokens:
            return self.mm_length
        return self.text_tokens.astype(np.int64) + self.n_images.astype(np.int64) * (visual_tokens - 1)

    def close(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = [None] * len(self.sources)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self.record(i)


def open_index(index_dir: str | os.PathLike, check_stale: bool = True) -> SFTIndex:
    return SFTIndex(index_dir, check_stale=check_stale)
