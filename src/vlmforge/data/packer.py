"""The bin packer both data paths share: samples into sequences of at most ``max_len`` tokens.

``plan_packs`` is an exact-fit greedy over *capacity buckets*: sample lengths are small
integers, so the pool of unpacked samples is kept as a count per length (plus, per length,
the indices still available). Each pack is filled with the longest samples first, and once
the remaining room could be closed by one or two samples (room <= 2 x longest available) it
looks for a sample, or a pair of samples, whose lengths add up to the room *exactly*
(a vectorised scan over the length buckets). Plain first-fit-decreasing leaves every pack with
a gap smaller than the shortest sample; closing gaps exactly brings the pack count to the
lower bound ceil(sum / max_len) or one above.

Cost: O(n) bucket operations plus O(max_len) numpy work per pack, so the time grows linearly
with the number of samples (no quadratic FFD scan).

``first_fit_decreasing`` is the plain baseline (same as Open-Qwen2VL's packer, vectorised).
"""

from __future__ import annotations

import numpy as np

__all__ = ["plan_packs", "first_fit_decreasing", "fill_stats", "lower_bound"]


def _check(lengths: np.ndarray, max_len: int) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64, copy=False)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if lengths.size:
        bad = np.flatnonzero((lengths < 1) | (lengths > max_len))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{bad.size} sample(s) have a length outside [1, max_len={max_len}] "
                f"(first: index {i}, length {int(lengths[i])}); truncate or drop them before packing"
            )
    return lengths


class _Pool:
    """Unpacked samples grouped by length: count[s] samples of length s are still available."""

    def __init__(self, lengths: np.ndarray, max_len: int):
        order = np.argsort(lengths, kind="stable")
        sizes = np.arange(max_len + 2)
        start = np.searchsorted(lengths[order], sizes, side="left")
        self.count = np.append(np.diff(start), 0).astype(np.int64)  # index s -> samples of length s
        # Python-list twins for the scalar hot path (numpy scalar indexing is much slower).
        self.cnt: list[int] = self.count.tolist()
        self.order: list[int] = order.tolist()
        self.start: list[int] = start.tolist()
        self.remaining = int(lengths.size)
        nz = np.flatnonzero(self.count)
        self.top = int(nz[-1]) if nz.size else 0  # longest available length (0: empty)
        self.bot = int(nz[0]) if nz.size else 0  # shortest available length

    def take(self, s: int) -> int:
        cnt = self.cnt
        c = cnt[s]
        cnt[s] = c - 1
        self.count[s] = c - 1
        self.remaining -= 1
        if c == 1:  # bucket emptied: move the top/bottom pointers past empty buckets
            if self.remaining == 0:
                self.top = self.bot = 0
            else:
                while cnt[self.top] == 0:
                    self.top -= 1
                while cnt[self.bot] == 0:
                    self.bot += 1
        return self.order[self.start[s] + c - 1]

    def largest_at_most(self, x: int) -> int:
        """Longest available length <= x (0 if none)."""
        if x >= self.top:
            return self.top
        if x < self.bot:
            return 0
        nz = np.flatnonzero(self.count[self.bot : x + 1])
        return int(self.bot + nz[-1]) if nz.size else 0

    def exact_pair(self, room: int) -> tuple[int, int] | None:
        """Two available lengths a <= b with a + b == room, preferring the longest b."""
        lo, hi = max(self.bot, room - self.top), room // 2
        if lo > hi:
            return None
        a = self.count[lo : hi + 1]
        b = self.count[room - hi : room - lo + 1][::-1]  # b[i] = count[room - (lo + i)]
        ok = (a > 0) & (b > 0)
        if room % 2 == 0 and hi == room - hi:  # a == b needs two samples of that length
            ok[-1] = self.cnt[hi] >= 2
        nz = np.flatnonzero(ok)
        if not nz.size:
            return None
        s = lo + int(nz[0])
        return s, room - s

    def closable(self, room: int) -> bool:
        """Whether some count k of available lengths can span ``room`` (k*bot <= room <= k*top).

        Rooms in the gaps (k*top, (k+1)*bot) can never be filled exactly: steer around them.
        """
        if room <= 0 or self.top == 0:
            return room == 0
        k = -(-room // self.top)
        return k * self.bot <= room

    def steer(self, room: int, want: int) -> int:
        """An available length s, nearest to ``want``, that leaves a closable room (0: none)."""
        sizes = self.bot + np.flatnonzero(self.count[self.bot : min(self.top, room) + 1])
        left = room - sizes
        k = -(-left // self.top)
        ok = np.flatnonzero(k * self.bot <= left)
        if not ok.size:
            return 0
        return int(sizes[ok[np.argmin(np.abs(sizes[ok] - want))]])

    def pair_sums(self, room: int) -> tuple[int, np.ndarray]:
        """(offset, has[k]): some two available lengths may sum to offset + k (multiplicity ignored).

        Only lengths that can be part of a triple within ``room`` (<= room - 2 x bot) matter."""
        hi = max(self.bot, min(self.top, room - 2 * self.bot))
        ind = (self.count[self.bot : hi + 1] > 0).astype(np.float64)
        if ind.size <= 512:
            conv = np.convolve(ind, ind)
        else:  # wide length range (e.g. SFT): FFT keeps this O(w log w)
            n = 2 * ind.size - 1
            nfft = 1 << (n - 1).bit_length()  # power of two: pocketfft is slow on awkward sizes
            f = np.fft.rfft(ind, nfft)
            conv = np.fft.irfft(f * f, nfft)[:n]
        return 2 * self.bot, conv > 0.5

    def exact_triple_first(self, room: int, sums: tuple[int, np.ndarray]) -> int:
        """A length a such that a + (some pair) == room, preferring the longest a (0: none)."""
        off, has = sums
        lo, hi = max(self.bot, room - off - has.size + 1), min(self.top, room - off)
        if lo > hi:
            return 0
        a = self.count[lo : hi + 1] > 0
        rest = has[room - off - hi : room - off - lo + 1][::-1]  # rest[i] = has[room - (lo+i) - off]
        nz = np.flatnonzero(a & rest)
        return lo + int(nz[-1]) if nz.size else 0


def plan_packs(lengths: np.ndarray, max_len: int, seed: int = 0, method: str = "auto") -> list[np.ndarray]:
    """Group sample indices into packs whose lengths sum to at most ``max_len``.

    Every index of ``lengths`` appears in exactly one pack. Lengths must lie in
    [1, max_len] (truncate or drop longer samples first). Deterministic for a given
    input and ``seed``. Returns a list of int64 index arrays.

    method: "exact" (exact-fit greedy, for many short samples per pack, e.g. captions),
    "ffd" (first-fit-decreasing, near-optimal when samples are long relative to max_len),
    "auto": exact when the mean sample is <= max_len / 8, else ffd; and if exact ends more
    than 0.2% + 1 pack above the lower bound, ffd is tried too and the smaller plan kept.
    FFD costs O(n x packs): plan windows of samples, not millions at once.
    """
    lengths = _check(lengths, max_len)
    if lengths.size == 0:
        return []
    if method not in ("auto", "exact", "ffd"):
        raise ValueError(f"unknown packing method {method!r} (auto | exact | ffd)")
    if method == "ffd" or (method == "auto" and lengths.mean() > max_len / 8):
        return first_fit_decreasing(lengths, max_len)
    packs = _exact_fit(lengths, max_len, seed)
    if method == "auto" and len(packs) > 1.002 * lower_bound(lengths, max_len) + 1:
        ffd = first_fit_decreasing(lengths, max_len)
        if len(ffd) < len(packs):
            return ffd
    return packs


def _exact_fit(lengths: np.ndarray, max_len: int, seed: int) -> list[np.ndarray]:
    pool = _Pool(lengths, max_len)
    # Packs are opened with samples in a seeded random order of lengths (not longest-first):
    # the pool then keeps the whole length spectrum until the end, so exact closing pairs
    # stay available. Samples of equal length are interchangeable, so the stream only
    # decides which *length* comes next.
    stream = lengths[np.random.default_rng(seed).permutation(lengths.size)].tolist()
    pos = 0
    half = max_len // 2
    count = pool.cnt
    packs: list[np.ndarray] = []
    while pool.remaining:
        room, members, sums = max_len, [], None
        while pool.remaining and room >= pool.bot:
            # Closing attempts only in the second half of a pack (saves wasted O(width) scans when
            # samples are long relative to max_len).
            if room <= 2 * pool.top and room <= half:  # one or two samples could close the pack exactly
                if count[room] > 0:
                    members.append(pool.take(room))
                    break
                pair = pool.exact_pair(room)
                if pair is not None:
                    members.append(pool.take(pair[1]))
                    members.append(pool.take(pair[0]))
                    break
            if room <= 3 * pool.top and room <= half:  # three samples: pick the first so a pair closes the rest
                if sums is None:  # pair sums change little within one pack: compute once
                    sums = pool.pair_sums(room)
                a = pool.exact_triple_first(room, sums)
                if a:
                    members.append(pool.take(a))
                    room -= a
                    continue  # the pair check above now closes it (or the loop goes on)
            while count[stream[pos]] == 0:  # that length was used up by exact closes
                pos += 1
            s = stream[pos]
            if s <= room and pool.closable(room - s):
                pos += 1
            else:  # the stream's length would leave a room no set of samples can fill exactly
                s = pool.steer(room, s) or pool.largest_at_most(room)
            members.append(pool.take(s))
            room -= s
        packs.append(np.asarray(members, dtype=np.int64))
    return packs


def first_fit_decreasing(lengths: np.ndarray, max_len: int) -> list[np.ndarray]:
    """Plain first-fit-decreasing (the usual packer, e.g. Open-Qwen2VL's); baseline for benchmarks."""
    lengths = _check(lengths, max_len)
    order = np.argsort(-lengths, kind="stable")
    room = np.empty(lengths.size, dtype=np.int64)
    members: list[list[int]] = []
    nbins = 0
    for i in order:
        s = lengths[i]
        fits = np.flatnonzero(room[:nbins] >= s[None]) if nbins else ()
        if len(fits):
            j = int(fits[0])
            room[j] -= s
            members[j].append(int(i))
        else:
            room[nbins] = max_len - s
            members.append([int(i)])
            nbins += 1
    return [np.asarray(m, dtype=np.int64) for m in members]


def lower_bound(lengths: np.ndarray, max_len: int) -> int:
    """No packing can use fewer packs than ceil(total / max_len)."""
    total = int(np.asarray(lengths, dtype=np.int64).sum())
    return -(-total // max_len)


def fill_stats(lengths: np.ndarray, packs: list[np.ndarray], max_len: int) -> dict:
    """Mean fill = tokens / (packs x max_len); also min fill and the lower-bound fill."""
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.array([int(lengths[p].sum()) for p in packs], dtype=np.int64)
    total = int(used.sum())
    n = len(packs)
    lb = lower_bound(lengths, max_len) if lengths.size else 0
    return {
        "packs": n,
        "lower_bound_packs": lb,
        "tokens": total,
        "mean_fill": total / (n * max_len) if n else 0.0,
        "lower_bound_fill": total / (lb * max_len) if lb else 0.0,
        "min_fill": float(used.min() / max_len) if n else 0.0,
        "samples_per_pack": float(lengths.size / n) if n else 0.0,
    }
