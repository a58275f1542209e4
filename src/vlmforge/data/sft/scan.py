"""Byte spans of the records of an SFT file, found without parsing them.

``.jsonl``: a vectorised newline scan. ``.json`` (one array of records): a vectorised scan of the
structural bytes that tracks strings, escapes and depth across chunk borders. The format is
detected by content, not extension.
"""

from __future__ import annotations

import os

import numpy as np

from vlmforge.data.sft.records import SFTDataError

_CHUNK = 1 << 24  # 16 MiB of jsonl per newline scan step
_JSON_CHUNK = 1 << 22  # 4 MiB per JSON-array scan step


def _scan_jsonl(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, nbytes, line) of the non-blank lines of a jsonl file, without parsing them."""
    ends = []
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

    Per chunk, only the structural bytes (``"{}[]``) are kept as events: unescaped quotes
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
