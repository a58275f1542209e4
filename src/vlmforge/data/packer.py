"""The pack stage: caption shards -> packed shards + manifest (``vlmforge pack`` runs this).

One window of ``pack.window`` raw samples at a time: validate (damaged member, empty caption,
undecodable image -> skipped and counted by reason, or an error in strict mode), batch-tokenize
the captions (fast tokenizer), compute multimodal lengths (N visual + caption + separator),
truncate or drop what exceeds max_len, mix in text-only chunks up to the target ratio, plan the
packs (:func:`vlmforge.data.packing.plan_packs`) and write one packed shard.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vlmforge.errors import UserError
from vlmforge.data.packed_shards import INDEX_SUFFIX, PackedShardWriter
from vlmforge.data.packing import lower_bound, plan_packs

TOO_LONG = ("truncate", "drop")


def _error_reason(error: str) -> str:
    """Map a RawSample.error text to a short manifest reason."""
    e = error.lower()
    for needle, reason in (
        ("damaged tar", "damaged_tar"),
        ("missing image", "missing_image"),
        ("missing .txt", "missing_caption"),
        ("utf-8", "caption_not_utf8"),
        ("bad .json", "bad_json"),
    ):
        if needle in e:
            return reason
    return "damaged_sample"


def _check_image(data: bytes) -> str | None:
    from vlmforge.shards import ImageDecodeError, decode_image

    try:
        decode_image(data)
        return None
    except ImageDecodeError as e:
        return str(e)


def _check_images(samples: list) -> list[str | None]:
    return [_check_image(s.image_bytes) for s in samples]


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


def _resolve_corpus(spec: str) -> list[str]:
    paths = sorted(p for part in spec.split(",") for p in (glob.glob(part.strip()) or [part.strip()]))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"pack.text_corpus: file(s) not found: {', '.join(missing)}")
    return paths


class _Stats:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()
        self.sample_lengths: list[np.ndarray] = []
        self.pack_lengths: list[np.ndarray] = []
        self.mm_tokens = 0
        self.text_tokens = 0


def pack_shards(
    cfg,
    inputs: list[str],
    out_dir: str | os.PathLike,
    tokenizer_path: str,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pack stage; returns the manifest dict (also written to ``out_dir/manifest.json``)."""
    from tqdm import tqdm

    from vlmforge.config import save_resolved

    from vlmforge.errors import ConfigError
    from vlmforge.arch.tokens import EOS, IM_END, IMAGE_TOKEN
    from vlmforge.text.tokenization import load_tokenizer
    from vlmforge.files import write_manifest
    from vlmforge.arch.geometry import image_preprocess_spec, visual_tokens_per_image
    from vlmforge.shards import iter_raw_samples, list_shards

    pc = cfg.pack
    max_len, window = int(pc.max_len), int(pc.window)
    if pc.too_long not in TOO_LONG:
        raise ConfigError(f"pack.too_long must be one of {TOO_LONG}, got {pc.too_long!r}")
    if window < 1 or max_len < 2:
        raise ConfigError("pack.window must be >= 1 and pack.max_len >= 2")
    n_vis = visual_tokens_per_image(cfg.model)
    if n_vis + 2 > max_len:
        raise ConfigError(f"pack.max_len={max_len} cannot hold one image ({n_vis} visual tokens) plus a caption")
    shards = list_shards(list(inputs))
    out = Path(out_dir)
    if out.exists() and any(out.glob(f"*{INDEX_SUFFIX}")):
        if not overwrite:
            raise UserError(f"{out} already holds packed shards (use --overwrite to replace them)")
        for p in list(out.glob("*.tar")) + list(out.glob(f"*{INDEX_SUFFIX}")):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    tok = load_tokenizer(tokenizer_path, trust_remote_code=cfg.tokenizer.trust_remote_code)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    sep_id = tok.convert_tokens_to_ids(IM_END)
    pad_id = tok.convert_tokens_to_ids(EOS)
    if sep_id is None or sep_id == tok.unk_token_id:
        raise UserError(f"tokenizer {tokenizer_path} has no {IM_END} token")

    text_chunks = None
    if pc.text_ratio > 0:
        if not pc.text_corpus:
            raise ConfigError("pack.text_ratio > 0 needs pack.text_corpus")
        chunk = max(1, min(int(pc.text_chunk_len), max_len - 1))
        text_chunks = iter_text_chunks(_resolve_corpus(pc.text_corpus), tok, chunk)
    text_exhausted = False

    st = _Stats(max_len)
    pool = ThreadPoolExecutor(max(1, int(pc.threads))) if pc.check_images else None

    def bad(sample, reason: str, detail: str) -> None:
        if pc.strict:
            raise UserError(f"{sample.shard}: sample {sample.key!r}: {reason}: {detail}")
        st.dropped[reason] += 1

    carry: list[dict] = []  # samples of the last window's emptiest pack, re-planned with the next window

    def flush(raw: list, shard_index: int, last: bool) -> None:
        nonlocal text_exhausted, carry
        # 1. validate, in input order (strict mode names the first bad sample)
        checkable = [s for s in raw if not s.error and s.caption and s.caption.strip()]
        img_err = {}
        if pool is not None and checkable:
            # one task per thread, not per image: per-task overhead dominates for small images
            k = max(1, -(-len(checkable) // max(1, int(pc.threads))))
            chunks = [checkable[i : i + k] for i in range(0, len(checkable), k)]
            for chunk, errs in zip(chunks, pool.map(_check_images, chunks)):
                img_err.update(zip((id(s) for s in chunk), errs))
        ok = []
        for s in raw:
            if s.error:
                bad(s, _error_reason(s.error), s.error)
            elif s.caption is None or not s.caption.strip():
                bad(s, "empty_caption", "caption is empty")
            elif img_err.get(id(s)):
                bad(s, "undecodable_image", img_err[id(s)])
            else:
                ok.append(s)
        # 2. tokenize + lengths
        caps = tok([s.caption.strip() for s in ok], add_special_tokens=False)["input_ids"] if ok else []
        items: list[dict] = []
        room = max_len - n_vis - 1  # caption tokens that fit beside the image and the separator
        for s, ids in zip(ok, caps):
            if not ids:
                bad(s, "empty_caption", "caption has no tokens")
                continue
            truncated = False
            if len(ids) > room:
                if pc.too_long == "drop":
                    bad(s, "too_long", f"{n_vis + len(ids) + 1} tokens > max_len {max_len}")
                    continue
                ids, truncated = ids[:room], True
                st.counts["truncated"] += 1
            items.append({"key": s.key, "kind": "image", "ids": ids, "image": s.image_bytes,
                          "sep": True, "truncated": truncated, "len": n_vis + len(ids) + 1})
        mm = sum(it["len"] for it in items)
        st.mm_tokens += mm
        # 3. text-only mixing: keep the running text:multimodal ratio at the target
        if text_chunks is not None and not text_exhausted:
            while st.text_tokens < pc.text_ratio * st.mm_tokens:
                nxt = next(text_chunks, None)
                if nxt is None:
                    text_exhausted = True
                    break
                key, ids, ends = nxt
                n = len(ids) + int(ends)
                items.append({"key": key, "kind": "text", "ids": ids, "image": None,
                              "sep": ends, "truncated": False, "len": n})
                st.text_tokens += n
                st.counts["text_samples"] += 1
        items = carry + items
        carry = []
        if not items:
            return
        # 4. plan + write
        lengths = np.array([it["len"] for it in items], dtype=np.int64)
        packs = plan_packs(lengths, max_len, seed=int(cfg.seed) + shard_index, method=pc.method)
        if pc.carry_over and not last and len(packs) > 1:
            # A window's packing leaves one part-filled pack; its samples join the next window instead.
            used = [int(lengths[p].sum()) for p in packs]
            worst = int(np.argmin(used))
            if used[worst] < 0.99 * max_len:
                carry = [items[i] for i in packs[worst]]
                packs = packs[:worst] + packs[worst + 1 :]
        written = np.concatenate(packs)
        writer = PackedShardWriter(out, shard_index)
        try:
            for p in packs:
                members = [items[i] for i in p]
                meta = {
                    "length": int(lengths[p].sum()),
                    "visual_tokens": n_vis,
                    "samples": [
                        {"key": m["key"], "kind": m["kind"], "n_text": len(m["ids"]),
                         "images": int(m["image"] is not None), "sep": m["sep"], "truncated": m["truncated"]}
                        for m in members
                    ],
                }
                tokens = np.fromiter((t for m in members for t in m["ids"]), dtype=np.int32)
                writer.add_pack(meta, tokens, [m["image"] for m in members if m["image"] is not None])
            writer.close()
        except BaseException:
            writer.abort()
            raise
        st.sample_lengths.append(lengths[written])
        st.pack_lengths.append(np.array([lengths[p].sum() for p in packs], dtype=np.int64))
        st.counts["packs"] += len(packs)
        st.counts["shards"] += 1
        st.counts["samples_packed"] += int(written.size)
        st.counts["image_samples"] += sum(items[i]["kind"] == "image" for i in written)

    raw: list = []
    shard_index = 0
    try:
        with tqdm(desc="pack", unit="sample", disable=not progress) as bar:
            for tar in shards:
                for s in iter_raw_samples(tar):
                    st.counts["samples_read"] += 1
                    raw.append(s)
                    bar.update(1)
                    if len(raw) >= window:
                        flush(raw, shard_index, last=False)
                        shard_index += 1
                        raw = []
            if raw or carry:
                flush(raw, shard_index, last=True)
    finally:
        if pool is not None:
            pool.shutdown()

    manifest_extra = _summaries(st, max_len, int(pc.hist_bins))
    manifest_extra["geometry"] = {
        "max_len": max_len, "visual_tokens": n_vis, "image_token_id": int(image_id),
        "sep_id": int(sep_id), "pad_id": int(pad_id), "image_preprocess": image_preprocess_spec(cfg.model),
        "tokenizer": str(tokenizer_path),
    }
    manifest_extra["text_mix"] = {
        "target_ratio": float(pc.text_ratio),
        "achieved_ratio": st.text_tokens / st.mm_tokens if st.mm_tokens else 0.0,
        "text_tokens": st.text_tokens, "multimodal_tokens": st.mm_tokens,
        "corpus_exhausted": text_exhausted,
    }
    counts = {k: int(st.counts[k]) for k in
              ("samples_read", "samples_packed", "image_samples", "text_samples", "truncated", "packs", "shards")}
    save_resolved(cfg, out)
    write_manifest(out, "pack", inputs=shards, config=cfg, counts=counts,
                   dropped=dict(sorted(st.dropped.items())), **manifest_extra)
    with open(out / "manifest.json", encoding="utf-8") as f:
        return json.load(f)


def _summaries(st: _Stats, max_len: int, bins: int) -> dict:
    lengths = np.concatenate(st.sample_lengths) if st.sample_lengths else np.zeros(0, np.int64)
    packs = np.concatenate(st.pack_lengths) if st.pack_lengths else np.zeros(0, np.int64)
    total = int(lengths.sum())
    fill = {
        "mean_fill": total / (packs.size * max_len) if packs.size else 0.0,
        "min_fill": float(packs.min() / max_len) if packs.size else 0.0,
        "lower_bound_fill": total / (lower_bound(lengths, max_len) * max_len) if total else 0.0,
        "tokens": total,
        "padding_tokens": int(packs.size * max_len - total),
        "samples_per_pack": float(lengths.size / packs.size) if packs.size else 0.0,
    }
    edges = np.linspace(0, max_len, bins + 1).round().astype(np.int64)
    hist = np.histogram(lengths, bins=edges)[0] if lengths.size else np.zeros(bins, np.int64)
    fill_edges = np.linspace(0.9, 1.0, 11)
    fill_hist = np.histogram(packs / max_len, bins=fill_edges)[0] if packs.size else np.zeros(10, np.int64)
    return {
        "fill": fill,
        "length_histogram": {"edges": edges.tolist(), "counts": hist.tolist(),
                             "min": int(lengths.min()) if lengths.size else 0,
                             "max": int(lengths.max()) if lengths.size else 0,
                             "mean": float(lengths.mean()) if lengths.size else 0.0},
        "pack_fill_histogram": {"edges": [round(x, 3) for x in fill_edges.tolist()], "counts": fill_hist.tolist(),
                                "below_0.9": int((packs < 0.9 * max_len).sum())},
    }
