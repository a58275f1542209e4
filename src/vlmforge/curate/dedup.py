"""``curate dedup``: exact duplicates (uid, image bytes, caption, pair) and near-duplicate images.

Two passes so that duplicates across shards (and ranks) are found: the inspect pass records small
per-sample fingerprints in parquet sidecars (sha256 of the image bytes, hash of the normalised
caption, 64-bit perceptual hash); the decide step sees all fingerprints at once. In every group of
duplicates the first sample in input order is kept; a near-duplicate is dropped only when it is
near a sample that is kept (greedy, no transitive chains).

Near-duplicates by perceptual hash: pHash (DCT, 64 bits, ``imagehash``) within Hamming distance
``d``. All pairs within ``d`` are found exactly without comparing all pairs: split the 64 bits
into ``d + 1`` bands; two hashes within distance ``d`` agree on at least one whole band
(pigeonhole), so only hashes sharing a band value are compared. Near-duplicates by embedding:
cosine similarity of image embeddings (a CLIP/SigLIP model) >= a threshold, blocked matrix
products (quadratic; fine to ~10^6 per run, shard a larger pool by a coarse key first).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Optional

import imagehash
import numpy as np

from vlmforge.curate.io import check_score_folder, read_parquet, shard_stem
from vlmforge.curate.reshard import DecideResult
from vlmforge.curate.truth import dedup_metrics
from vlmforge.errors import UserError

_WS = re.compile(r"\s+")
_PUNCT_END = re.compile(r"[\s.,;:!?]+$")


def normalize_caption(text: Optional[str]) -> str:
    """NFKC, lower case, collapsed whitespace, trailing punctuation dropped."""
    t = unicodedata.normalize("NFKC", text or "").lower()
    t = _WS.sub(" ", t).strip()
    return _PUNCT_END.sub("", t)


def phash64(image) -> int:
    bits = imagehash.phash(image).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def make_extra(near_method: str):
    """The inspect-pass fingerprint function (per sample, runs in reader workers)."""

    def extra(sample, image) -> dict:
        cap = normalize_caption(sample.caption)
        row = {
            "image_sha256": hashlib.sha256(sample.image_bytes or b"").hexdigest(),
            "caption_hash": hashlib.sha1(cap.encode("utf-8")).hexdigest(),
        }
        if near_method == "phash" and image is not None:
            # int64 view of the 64 bits (parquet has no uint64 in every reader)
            row["phash"] = int(np.array([phash64(image)], dtype=np.uint64).view(np.int64)[0])
        return row

    return extra


def _popcount64(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def phash_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming(hashes[i], hashes[j]) <= max_distance."""
    h = hashes.astype(np.uint64)
    n_bands = max_distance + 1
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    seen: set[tuple[int, int]] = set()
    pairs = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        width = hi - lo
        band = (h >> np.uint64(lo)) & np.uint64((1 << width) - 1)
        order = np.argsort(band, kind="stable")
        sb = band[order]
        starts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1]])
        ends = np.r_[starts[1:], len(sb)]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = np.sort(order[s:e])
            for a_i in range(len(members) - 1):
                a = members[a_i]
                rest = members[a_i + 1 :]
                d = _popcount64(h[rest] ^ h[a])
                for b, dist in zip(rest[d <= max_distance], d[d <= max_distance]):
                    key = (int(a), int(b))
                    if key not in seen:
                        seen.add(key)
                        pairs.append((int(a), int(b), int(dist)))
    return pairs


def embedding_pairs(emb: np.ndarray, min_cosine: float, block: int = 4096) -> list[tuple[int, int, float]]:
    """All (i, j, cosine) with i < j and cosine >= min_cosine (rows L2-normalised here)."""
    x = emb.astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    pairs = []
    for s in range(0, len(x), block):
        sims = x[s : s + block] @ x.T
        ii, jj = np.nonzero(sims >= min_cosine)
        for i, j in zip(ii + s, jj):
            if i < j:
                pairs.append((int(i), int(j), float(sims[i - s, j])))
    return pairs


def embeddings_from_scores(score_dir: str, shards: list[str]):
    """Callable(table, rows) -> [len(rows), D] image embeddings from score sidecars (column
    ``image_embedding``, written by ``curate score --set curate.score.save_embeddings=true``)."""
    check_score_folder(score_dir, shards, f"--embeddings {score_dir}")  # every shard scored, none changed since

    def load(table, rows: np.ndarray) -> np.ndarray:
        in_index = table.column("in_index").to_numpy()[rows]
        keys = table.column("key").to_numpy(zero_copy_only=False)[rows]
        out = None
        for i in np.unique(in_index):
            path = Path(score_dir) / f"{shard_stem(shards[int(i)])}.parquet"
            if not path.exists():
                raise UserError(f"{path}: no score sidecar for {shards[int(i)]} (score every input shard first)")
            t = read_parquet(path)
            if "image_embedding" not in t.column_names:
                raise UserError(f"{path}: no image_embedding column (score with curate.score.save_embeddings=true)")
            lookup = dict(zip(t.column("key").to_pylist(), t.column("image_embedding").to_pylist()))
            for r in np.flatnonzero(in_index == i):
                e = lookup.get(keys[r])
                if e is None:
                    raise UserError(f"{path}: no embedding for sample {keys[r]}")
                if out is None:
                    out = np.zeros((len(rows), len(e)), dtype=np.float32)
                out[r] = e
        return np.zeros((0, 1), dtype=np.float32) if out is None else out

    return load


def make_decide(exact: list[str], near_method: str, phash_max_distance: int, embeddings=None,
                min_cosine: float = 0.95, block: int = 4096, truth=None, shards=None):
    """Global decision: exact kinds in the given order, then near-duplicates among the survivors."""

    def decide(table, valid: np.ndarray) -> DecideResult:
        n = table.num_rows
        keep = valid.copy()
        reason: list = [None] * n
        col = {c: table.column(c).to_pylist() if c in table.column_names else [None] * n
               for c in ("uid", "image_sha256", "caption_hash", "key")}
        report: dict = {"duplicates": {}}
        for kind in exact:
            if kind == "uid":
                vals = col["uid"]
            elif kind == "image":
                vals = col["image_sha256"]
            elif kind == "caption":
                vals = col["caption_hash"]
            else:
                vals = [None if a is None else f"{a}:{b}" for a, b in zip(col["image_sha256"], col["caption_hash"])]
            first: dict = {}
            found = 0
            for i in range(n):
                if not keep[i] or vals[i] is None:
                    continue
                if vals[i] in first:
                    keep[i] = False
                    reason[i] = f"exact_duplicate_{kind}"
                    found += 1
                else:
                    first[vals[i]] = i
            report["duplicates"][f"exact_{kind}"] = found

        if near_method != "none":
            alive = np.flatnonzero(keep)
            if near_method == "phash":
                if "phash" not in table.column_names:
                    pairs = []
                else:
                    ph = np.array([table.column("phash")[int(i)].as_py() or 0 for i in alive], dtype=np.int64)
                    pairs = phash_pairs(ph.view(np.uint64), phash_max_distance)
            else:
                if embeddings is None:
                    raise UserError("near-duplicate method 'embedding' needs image embeddings (score.model)")
                pairs = embedding_pairs(embeddings(table, alive), min_cosine, block)
            # Greedy in input order: a sample is dropped when it is near an earlier sample that was
            # kept. No transitive chains (A~B~C does not drop C unless C is near a kept sample).
            earlier: dict[int, list] = {}
            for a, b, _ in pairs:
                earlier.setdefault(max(a, b), []).append(min(a, b))
            kept_local = np.ones(len(alive), dtype=bool)
            group_of = np.arange(len(alive))
            near = 0
            for b in sorted(earlier):
                hits = [a for a in earlier[b] if kept_local[a]]
                if hits:
                    kept_local[b] = False
                    group_of[b] = min(hits)
                    g = alive[b]
                    keep[g] = False
                    reason[g] = f"near_duplicate_{near_method}"
                    near += 1
            clusters: dict = {}
            for local, root in enumerate(group_of):
                clusters.setdefault(int(root), []).append(col["key"][alive[local]])
            groups = [v for v in clusters.values() if len(v) > 1]
            report["duplicates"][f"near_{near_method}"] = near
            report["near_duplicate_groups"] = len(groups)
            report["near_duplicate_examples"] = groups[:20]
            report["near_duplicate_pairs"] = len(pairs)
        if truth is not None:
            report["ground_truth"] = dedup_metrics(truth, table, keep, reason, valid)
        return DecideResult(keep=keep, reason=reason, report=report)

    return decide
