"""The pack stage: caption shards -> packed shards + manifest (``vlmforge pack`` runs this).

One window of ``pack.window`` raw samples at a time: validate (damaged member, empty caption,
undecodable image -> skipped and counted by reason, or an error in strict mode), batch-tokenize
the captions (fast tokenizer), compute multimodal lengths (N visual + caption + separator),
truncate or drop what exceeds max_len, mix in text-only chunks up to the target ratio, plan the
packs (:func:`vlmforge.data.packer.plan_packs`) and write one packed shard
(:mod:`vlmforge.data.pretrain.packed_shards`).

With an image layout (``model.images.tiles`` on, or a ``start`` / ``end`` wrap), an image costs
what :func:`vlmforge.arch.geometry.image_layout` says for its size (tiles x tokens per tile + the
wrap), read from the decode the image check already does (or, with ``pack.check_images=false``,
from the image's header); the shard records each image's size and tiles so the loader cuts the
same tiles. Without one, the stage is the fixed-grid stage it always was, byte for byte.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from vlmforge.arch.geometry import image_layout, image_preprocess_spec, visual_tokens_per_image
from vlmforge.arch.tiles import ImageLayout
from vlmforge.arch.tokens import EOS, IM_END, IMAGE_TOKEN
from vlmforge.config import save_resolved
from vlmforge.config.recipe import Recipe
from vlmforge.data.packer import lower_bound, plan_packs
from vlmforge.data.pretrain.packed_shards import (
    FORMAT_VERSION,
    INDEX_SUFFIX,
    LAYOUT_FORMAT_VERSION,
    PackedShardWriter,
)
from vlmforge.data.pretrain.text_corpus import iter_text_chunks, resolve_corpus
from vlmforge.errors import ConfigError, UserError
from vlmforge.files import note_example, prepare_out_dir, write_manifest
from vlmforge.imagedecode import ImageDecodeError, ImageTooLargeError, decode_image, header_size
from vlmforge.shards import iter_raw_samples, list_shards, shard_shortfall
from vlmforge.text.tokenization import load_tokenizer, tokenizer_fingerprint


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


def _check_image(data: bytes) -> tuple[tuple[str, str] | None, tuple[int, int] | None]:
    """(None, (width, height)), or ((reason, message), None) for an image that does not decode or
    is over the pixel cap."""
    try:
        return None, decode_image(data).size
    except ImageTooLargeError as e:
        return ("image_too_large", str(e)), None
    except ImageDecodeError as e:
        return ("undecodable_image", str(e)), None


def _check_images(samples: list) -> list[tuple[tuple[str, str] | None, tuple[int, int] | None]]:
    return [_check_image(s.image_bytes) for s in samples]


def _check_header(data: bytes) -> tuple[tuple[str, str] | None, tuple[int, int] | None]:
    """:func:`_check_image` from the image's header alone (``pack.check_images=false``): the size
    the loader's decode gives, the same pixel cap."""
    try:
        return None, header_size(data)
    except ImageTooLargeError as e:
        return ("image_too_large", str(e)), None
    except ImageDecodeError as e:
        return ("undecodable_image", str(e)), None


class _Stats:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()
        self.examples: dict[str, list[dict]] = {}  # reason -> the first few dropped samples (shard, key)
        self.sample_lengths: list[np.ndarray] = []
        self.pack_lengths: list[np.ndarray] = []
        self.image_tiles: list[int] = []  # per packed image (image layout only)
        self.image_tokens: list[int] = []  # per packed image: placeholders + wrap (image layout only)
        self.pack_image_tokens: list[int] = []  # per pack: placeholders + wrap (image layout only)
        self.mm_tokens = 0
        self.text_tokens = 0


class _PackStage:
    """The pack stage's state across windows: one :meth:`window` call per output shard."""

    def __init__(self, cfg: Recipe, tok, out: Path, n_vis: int, text_chunks: Iterator | None,
                 layout: ImageLayout | None = None):
        self.pc, self.seed, self.tok, self.out, self.n_vis = cfg.pack, int(cfg.seed), tok, out, n_vis
        self.layout = layout  # None: the fixed grid (n_vis tokens per image, nothing recorded per image)
        self.max_len = int(self.pc.max_len)
        self.text_chunks, self.text_exhausted = text_chunks, False
        self.st = _Stats(self.max_len)
        self.pool = ThreadPoolExecutor(max(1, int(self.pc.threads))) if self.pc.check_images else None
        self.carry: list[dict] = []  # samples of the last window's emptiest pack, re-planned with the next window

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def bad(self, sample, reason: str, detail: str) -> None:
        if self.pc.strict:
            raise UserError(f"{sample.shard}: sample {sample.key!r}: {reason}: {detail}")
        self.st.dropped[reason] += 1
        note_example(self.st.examples, reason, {"shard": sample.shard, "key": sample.key, "error": detail})

    def window(self, raw: list, shard_index: int, last: bool) -> None:
        """Validate, tokenize, mix, plan and write one window of raw samples as shard ``shard_index``."""
        ok, sizes = self.valid(raw)
        items = self.caption_items(ok, sizes)
        self.st.mm_tokens += sum(it["len"] for it in items)
        items = self.carry + items + self.text_items()
        self.carry = []
        if not items:
            return
        lengths = np.array([it["len"] for it in items], dtype=np.int64)
        packs = self.plan(items, lengths, shard_index, last)
        self.write(items, lengths, packs, shard_index)

    def valid(self, raw: list) -> tuple[list, list]:
        """The samples that pass the checks, in input order (strict mode names the first bad one),
        and their images' (width, height) (None each without an image layout)."""
        checkable = [s for s in raw if not s.error and s.caption and s.caption.strip()]
        img_err, img_size = {}, {}
        if self.pool is not None and checkable:
            # one task per thread, not per image: per-task overhead would dominate for small images
            k = max(1, -(-len(checkable) // max(1, int(self.pc.threads))))
            chunks = [checkable[i : i + k] for i in range(0, len(checkable), k)]
            for chunk, res in zip(chunks, self.pool.map(_check_images, chunks)):
                for s, (err, size) in zip(chunk, res):
                    img_err[id(s)], img_size[id(s)] = err, size
        elif self.layout is not None:  # no full decode asked for: the header gives the size
            for s in checkable:
                img_err[id(s)], img_size[id(s)] = _check_header(s.image_bytes)
        ok, sizes = [], []
        for s in raw:
            if s.error:
                self.bad(s, _error_reason(s.error), s.error)
            elif s.caption is None or not s.caption.strip():
                self.bad(s, "empty_caption", "caption is empty")
            elif img_err.get(id(s)):
                self.bad(s, *img_err[id(s)])
            else:
                ok.append(s)
                sizes.append(img_size.get(id(s)) if self.layout is not None else None)
        return ok, sizes

    def caption_items(self, ok: list, sizes: list) -> list[dict]:
        """Tokenized captions with their multimodal lengths; too long ones truncated or dropped."""
        max_len = self.max_len
        caps = self.tok([s.caption.strip() for s in ok], add_special_tokens=False)["input_ids"] if ok else []
        items: list[dict] = []
        for s, size, ids in zip(ok, sizes, caps):
            if not ids:
                self.bad(s, "empty_caption", "caption has no tokens")
                continue
            n_vis, tiles = self.n_vis, None
            if self.layout is not None:
                tiles, n_vis = self.layout.tiles([size])[0], self.layout.visual_tokens([size])[0]
                if n_vis + 2 > max_len:  # no caption cut can make room: the image alone is too long
                    self.bad(s, "image_too_long", f"{size[0]}x{size[1]} image: {tiles} tiles = {n_vis} tokens, "
                                                  f"no room for a caption in max_len {max_len}")
                    continue
            room = max_len - n_vis - 1  # caption tokens that fit beside the image and the separator
            truncated = False
            if len(ids) > room:
                if self.pc.too_long == "drop":
                    self.bad(s, "too_long", f"{n_vis + len(ids) + 1} tokens > max_len {max_len}")
                    continue
                ids, truncated = ids[:room], True
                self.st.counts["truncated"] += 1
            item = {"key": s.key, "kind": "image", "ids": ids, "image": s.image_bytes,
                    "sep": True, "truncated": truncated, "len": n_vis + len(ids) + 1}
            if tiles is not None:
                item.update(size=[int(size[0]), int(size[1])], tiles=int(tiles), image_tokens=int(n_vis))
            items.append(item)
        return items

    def text_items(self) -> list[dict]:
        """Text-only chunks that bring the running text:multimodal token ratio up to the target."""
        items: list[dict] = []
        if self.text_chunks is None or self.text_exhausted:
            return items
        st = self.st
        while st.text_tokens < self.pc.text_ratio * st.mm_tokens:
            nxt = next(self.text_chunks, None)
            if nxt is None:
                self.text_exhausted = True
                break
            key, ids, ends = nxt
            n = len(ids) + int(ends)
            items.append({"key": key, "kind": "text", "ids": ids, "image": None,
                          "sep": ends, "truncated": False, "len": n})
            st.text_tokens += n
            st.counts["text_samples"] += 1
        return items

    def plan(self, items: list[dict], lengths: np.ndarray, shard_index: int, last: bool) -> list[np.ndarray]:
        """The window's packs; unless it is the last window, its emptiest pack goes to ``carry``."""
        packs = plan_packs(lengths, self.max_len, seed=self.seed + shard_index, method=self.pc.method)
        if self.pc.carry_over and not last and len(packs) > 1:
            # A window's packing leaves one part-filled pack; its samples join the next window instead.
            used = [int(lengths[p].sum()) for p in packs]
            worst = int(np.argmin(used))
            if used[worst] < 0.99 * self.max_len:
                self.carry = [items[i] for i in packs[worst]]
                packs = packs[:worst] + packs[worst + 1 :]
        return packs

    def write(self, items: list[dict], lengths: np.ndarray, packs: list[np.ndarray], shard_index: int) -> None:
        """One packed shard (:class:`PackedShardWriter`), and its counts and lengths in the stats."""
        written = np.concatenate(packs)
        tiled = self.layout is not None
        writer = PackedShardWriter(self.out, shard_index, LAYOUT_FORMAT_VERSION if tiled else FORMAT_VERSION)
        st = self.st
        try:
            for p in packs:
                members = [items[i] for i in p]
                meta = {
                    "length": int(lengths[p].sum()),
                    "visual_tokens": self.n_vis,
                    "samples": [_sample_meta(m, tiled) for m in members],
                }
                if tiled:
                    meta["tiles"] = sum(m.get("tiles", 0) for m in members)
                    meta["image_tokens"] = sum(m.get("image_tokens", 0) for m in members)
                    st.image_tiles += [m["tiles"] for m in members if m["image"] is not None]
                    st.image_tokens += [m["image_tokens"] for m in members if m["image"] is not None]
                    st.pack_image_tokens.append(meta["image_tokens"])
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


def _sample_meta(m: dict, tiled: bool) -> dict:
    """A sample's entry in its pack's metadata (with an image layout, an image's size and tiles too)."""
    out = {"key": m["key"], "kind": m["kind"], "n_text": len(m["ids"]),
           "images": int(m["image"] is not None), "sep": m["sep"], "truncated": m["truncated"]}
    if tiled and m["image"] is not None:
        out.update(size=m["size"], tiles=m["tiles"])
    return out


def pack_shards(
    cfg: Recipe,
    inputs: list[str],
    out_dir: str | os.PathLike,
    tokenizer_path: str,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pack stage; returns the manifest dict (also written to ``out_dir/manifest.json``)."""
    pc = cfg.pack
    max_len, window = int(pc.max_len), int(pc.window)
    if window < 1 or max_len < 2:
        raise ConfigError("pack.window must be >= 1 and pack.max_len >= 2")
    n_vis = visual_tokens_per_image(cfg.model)
    if n_vis + 2 > max_len:
        raise ConfigError(f"pack.max_len={max_len} cannot hold one image ({n_vis} visual tokens) plus a caption")
    shards = list_shards(list(inputs))
    out = Path(out_dir)
    if prepare_out_dir(out, overwrite=overwrite):  # not empty, and --overwrite: replace the packed shards
        for p in list(out.glob("*.tar")) + list(out.glob(f"*{INDEX_SUFFIX}")):
            p.unlink()

    tok = load_tokenizer(tokenizer_path, trust_remote_code=cfg.tokenizer.trust_remote_code)
    layout = image_layout(cfg.model, tok)
    if layout.tiling is None and not layout.wrap_tokens:
        layout = None  # the fixed grid: exactly the stage of before
    else:
        t = layout.tiling
        least = layout.tokens_per_tile * ((t.min_tiles + (t.thumbnail and t.min_tiles > 1)) if t else 1)
        if least + layout.wrap_tokens + 2 > max_len:
            raise ConfigError(f"pack.max_len={max_len} cannot hold one image ({least} visual tokens + "
                              f"{layout.wrap_tokens} wrap tokens at the fewest tiles) plus a caption")
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
        text_chunks = iter_text_chunks(resolve_corpus(pc.text_corpus), tok, chunk)
    stage = _PackStage(cfg, tok, out, n_vis, text_chunks, layout)
    raw: list = []
    shard_index = 0
    missing: list[dict] = []  # shards that hold fewer samples than their _stats.json says
    try:
        with tqdm(desc="pack", unit="sample", disable=not progress) as bar:
            for tar in shards:
                n_read = 0
                for s in iter_raw_samples(tar):
                    n_read += bool(s.key)  # a tar cut before its first member yields one keyless error
                    stage.st.counts["samples_read"] += 1
                    raw.append(s)
                    bar.update(1)
                    if len(raw) >= window:
                        stage.window(raw, shard_index, last=False)
                        shard_index += 1
                        raw = []
                short = shard_shortfall(tar, n_read)
                if short is not None:
                    missing.append(short)
            if raw or stage.carry:
                stage.window(raw, shard_index, last=True)
    finally:
        stage.close()

    st = stage.st
    manifest_extra = _summaries(st, max_len, int(pc.hist_bins))
    manifest_extra["geometry"] = {
        "max_len": max_len, "visual_tokens": n_vis, "image_token_id": int(image_id),
        "sep_id": int(sep_id), "pad_id": int(pad_id), "image_preprocess": image_preprocess_spec(cfg.model),
        "tokenizer": str(tokenizer_path),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),  # train refuses a different tokenizer
    }
    if layout is not None:  # a fixed-grid manifest keeps exactly its keys of before
        manifest_extra["geometry"]["images"] = layout.record(cfg.model.images.start, cfg.model.images.end)
        manifest_extra["images"] = _image_summary(st)
    manifest_extra["text_mix"] = {
        "target_ratio": float(pc.text_ratio),
        "achieved_ratio": st.text_tokens / st.mm_tokens if st.mm_tokens else 0.0,
        "text_tokens": st.text_tokens, "multimodal_tokens": st.mm_tokens,
        "corpus_exhausted": stage.text_exhausted,
    }
    counts = {k: int(st.counts[k]) for k in
              ("samples_read", "samples_packed", "image_samples", "text_samples", "truncated", "packs", "shards")}
    counts["missing_samples"] = sum(m["missing"] for m in missing)
    manifest_extra["missing_samples"] = missing
    manifest_extra["dropped_examples"] = st.examples
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


def _image_summary(st: _Stats) -> dict:
    """Tiles per packed image, and visual tokens (placeholders + wrap) per image and per pack."""
    tiles = np.asarray(st.image_tiles, dtype=np.int64)
    per_image = np.asarray(st.image_tokens, dtype=np.int64)
    per_pack = np.asarray(st.pack_image_tokens, dtype=np.int64)
    values, counts = np.unique(tiles, return_counts=True)
    return {
        "images": int(tiles.size),
        "tiles": int(tiles.sum()),
        "tiles_per_image": {"mean": float(tiles.mean()) if tiles.size else 0.0,
                            "max": int(tiles.max()) if tiles.size else 0,
                            "histogram": {str(int(v)): int(c) for v, c in zip(values, counts)}},
        "visual_tokens": {"total": int(per_image.sum()),
                          "per_image_mean": float(per_image.mean()) if per_image.size else 0.0,
                          "per_image_max": int(per_image.max()) if per_image.size else 0,
                          "per_pack_mean": float(per_pack.mean()) if per_pack.size else 0.0,
                          "per_pack_max": int(per_pack.max()) if per_pack.size else 0},
    }
