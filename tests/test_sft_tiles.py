"""SFT data with InternVL's dynamic tiles and image wraps (index, samples, loader, model, training),
and rank balancing in the SFT loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_train import CountSteps, one_torch_thread
from PIL import Image

from vlmforge.arch.geometry import image_layout, image_preprocess_spec, wrap_ids
from vlmforge.arch.tiles import ImageLayout, Tiling
from vlmforge.config import load_recipe
from vlmforge.config.sft import SFTDataConfig
from vlmforge.data.balance import balanced_plan
from vlmforge.data.collate import IGNORE_INDEX as IGNORE
from vlmforge.data.collate import collate_packs
from vlmforge.data.sft.augment import jpeg_quality, jpeg_reencode
from vlmforge.data.sft.build import build_index
from vlmforge.data.sft.index import open_index
from vlmforge.data.sft.loader import SFTLoader, build_sft_loader
from vlmforge.data.sft.records import SFTDataError
from vlmforge.data.sft.samples import SFTDataset
from vlmforge.files import read_metrics
from vlmforge.images import dynamic_tiles, preprocess_batch
from vlmforge.text.chat import encode_conversation
from vlmforge.text.tokenization import load_tokenizer

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)

# tiny-siglip: 64 px tiles, 8 x 8 patch grid pooled to 2 x 2 = 4 tokens per tile
TILED = ["model.projector.pool_size=2", "model.images.tiles=true", "model.images.max_tiles=4"]
TPT = 4
# (width, height) -> tiles at max_tiles 4 with a thumbnail, worked by hand:
# 2:1 -> the 2x1 grid (aspect exact) + thumbnail; 1:1 -> 1x1, no thumbnail; 1:3 -> 1x3 + thumbnail
SIZES = {"wide": (128, 64), "square": (64, 64), "tall": (64, 192), "small": (20, 30)}
HAND_TILES = {"wide": 3, "square": 1, "tall": 4}
# the images of each record kind, cycling; None: text only
KINDS = [["wide"], ["square"], ["tall"], ["wide", "square"], None, ["small"]]


def write_world(root: Path, n: int = 24) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    for k, (name, size) in enumerate(SIZES.items()):
        # a gradient, so every tile (and the thumbnail) has different pixels
        x = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None, None]
        arr = np.concatenate([np.broadcast_to(x, (size[1], size[0], 1)), np.broadcast_to(y, (size[1], size[0], 1)),
                              np.full((size[1], size[0], 1), 40 * k, np.float32)], axis=2)
        Image.fromarray(arr.astype(np.uint8), "RGB").save(root / "img" / f"{name}.png")
    lines = []
    for i in range(n):
        imgs = KINDS[i % len(KINDS)]
        q = "Is there a red circle?" if i % 2 else "What colour is the square?"
        rec: dict = {"id": f"r{i}", "conversations": [
            {"from": "human", "value": ("<image>\n" * len(imgs or [])) + q},
            {"from": "gpt", "value": "Yes." if i % 3 else "The square is blue."}]}
        if imgs:
            rec["image"] = [f"img/{m}.png" for m in imgs] if len(imgs) > 1 else f"img/{imgs[0]}.png"
        lines.append(json.dumps(rec))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def recipe(*extra: str):
    return load_recipe("tiny/sft", [*TILED, *extra])


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_dir):
    """A tiled index built by the CLI with the tiny recipe (max_tiles 4, 4 tokens per tile)."""
    from vlmforge.cli import main

    root = write_world(tmp_path_factory.mktemp("tiles"))
    args = ["sft-index", "--recipe", "tiny/sft", "--input", str(root / "data.jsonl"), "--out", str(root / "idx"),
            "--image-root", str(root), "--tokenizer", tiny_tokenizer_dir]
    assert main([*args, *[a for s in TILED for a in ("--set", s)]]) == 0
    return root


def _cfg(**kw) -> SFTDataConfig:
    c = SFTDataConfig(max_len=256, pack_window=50)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _dataset(root: Path, tok, *extra: str, **kw) -> SFTDataset:
    cfg = recipe(*extra)
    return SFTDataset(root / "idx", tok, layout=image_layout(cfg.model, tok), image_spec=image_preprocess_spec(cfg.model),
                      **kw)


def _image_runs(ids: np.ndarray, image_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of image ids."""
    is_img = np.concatenate([[0], (ids == image_id).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(is_img))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


# ----------------------------------------------------------------------------- index


def test_the_index_counts_tiles_from_image_headers(world, tok):
    man = json.loads((world / "idx" / "manifest.json").read_text())
    assert man["index_version"] == 2 and "visual_tokens" in man["arrays"]
    assert man["images"] == {"tiles": True, "tile": 64, "min_tiles": 1, "max_tiles": 4, "thumbnail": True, "share_budget": True,
                             "tokens_per_tile": TPT, "start": None, "end": None, "start_ids": [], "end_ids": []}
    ix = open_index(world / "idx")
    layout = image_layout(recipe().model)
    assert layout.tiling == Tiling(64, 1, 4, True) and layout.tokens_per_tile == TPT
    small = layout.tiles([SIZES["small"]])[0]
    # a two-image sample shares the budget: 4 // 2 = 2 tiles each -> wide: 2x1 + thumbnail, square: 1
    per_kind = [HAND_TILES["wide"], HAND_TILES["square"], HAND_TILES["tall"], 3 + 1, 0, small]
    expect = np.array([per_kind[i % len(KINDS)] * TPT for i in range(len(ix))])
    assert (np.asarray(ix.record_visual) == expect).all()
    n_img = np.asarray(ix.n_images, np.int64)
    assert (np.asarray(ix.mm_length) == np.asarray(ix.text_tokens, np.int64) - n_img + expect).all()
    t = man["tiles"]
    images = [m for i in range(len(ix)) for m in (KINDS[i % len(KINDS)] or [])]
    tiles_each = [HAND_TILES.get(m, small) for m in images]
    assert t["images"] == len(images) == man["counts"]["images"] and t["tiles"] == sum(tiles_each)
    assert t["per_image_max"] == 4 and t["per_image_mean"] == pytest.approx(np.mean(tiles_each))
    assert t["per_image_histogram"] == {str(k): tiles_each.count(k) for k in sorted(set(tiles_each))}
    assert t["visual_tokens_max"] == 16 and t["visual_tokens_mean"] == pytest.approx(expect.mean())


def test_bad_and_missing_headers_are_counted(world, tmp_path, tiny_tokenizer_dir):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image at all")
    Image.new("RGB", (128, 64)).save(tmp_path / "img" / "ok.png")
    rec = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Yes."}]}
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({**rec, "image": f"img/{p}"}) + "\n" for p in ("ok.png", "broken.png", "none.png")))
    m = build_index([src], tmp_path / "idx", layout=image_layout(recipe().model), image_root=tmp_path,
                    tokenizer=tiny_tokenizer_dir, progress=False, check_images=False)  # headers are read anyway
    assert m["counts"]["records"] == 1 and m["dropped"] == {"bad_image": 1, "missing_image": 1}
    assert m["dropped_examples"]["bad_image"][0]["line"] == 2
    assert int(open_index(tmp_path / "idx").record_visual[0]) == 3 * TPT
    with pytest.raises(SFTDataError, match=r"d.jsonl:2: bad_image"):
        build_index([src], tmp_path / "strict", layout=image_layout(recipe().model), image_root=tmp_path,
                    tokenizer=tiny_tokenizer_dir, progress=False, strict=True)


def test_a_wrap_alone_reads_no_image_header(tmp_path, tok, tiny_tokenizer_dir):
    """Without tiles every image costs TPT + wrap whatever its size: with check_images off the index
    keeps records whose image is not an image (or not there), and their tokens need no header."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image at all")
    rec = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Yes."}]}
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({**rec, "image": f"img/{p}"}) + "\n" for p in ("broken.png", "none.png")))
    cfg = recipe("model.images.tiles=false", "model.images.start=<img>", "model.images.end=</img>")
    layout = image_layout(cfg.model, tok)
    assert layout.dynamic and not layout.needs_sizes
    m = build_index([src], tmp_path / "idx", layout=layout, image_root=tmp_path, tokenizer=tiny_tokenizer_dir,
                    progress=False, check_images=False)
    wrap = len(wrap_ids(tok, "<img>")) + len(wrap_ids(tok, "</img>"))
    assert m["counts"]["records"] == 2 and m["dropped"] == {}
    assert [int(v) for v in open_index(tmp_path / "idx").record_visual] == [TPT + wrap] * 2
    ds = SFTDataset(tmp_path / "idx", tok, layout=layout, image_spec=image_preprocess_spec(cfg.model))
    ids, labels, _ = ds.tokens(0)
    assert ids.size == int(ds.index.mm_length[0]) and int((ids == ds.image_id).sum()) == TPT
    with pytest.raises(SFTDataError, match="broken.png") as e:  # training decodes it, and counts it
        ds[0]
    assert e.value.reason == "bad_image"


def test_sft_index_with_tiles_and_no_image_root_is_one_line_naming_the_flag(world, tmp_path, tiny_tokenizer_dir,
                                                                             capsys):
    from vlmforge.cli import main

    args = ["sft-index", "--recipe", "tiny/sft", "--input", str(world / "data.jsonl"), "--out", str(tmp_path / "idx"),
            "--tokenizer", tiny_tokenizer_dir, *[a for s in TILED for a in ("--set", s)]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--image-root" in err and "sft.image_root" in err and "data.jsonl" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "idx").exists()
    assert main([*args, "--set", f"sft.image_root={world}"]) == 0  # the recipe's root is as good
    capsys.readouterr()
    fixed = ["sft-index", "--recipe", "tiny/sft", "--input", str(world / "data.jsonl"), "--out", str(tmp_path / "f"),
             "--tokenizer", tiny_tokenizer_dir, "--set", "model.projector.pool_size=2"]
    assert main(fixed) == 0  # a fixed grid reads no image size: no root needed, as before


def test_a_meta_sources_max_dynamic_patch_is_its_tile_budget(world, tmp_path, tok, tiny_tokenizer_dir):
    wide = {"image": "img/wide.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                       {"from": "gpt", "value": "Yes."}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(wide) + "\n")
    meta = {"one": {"root": str(world), "annotation": str(tmp_path / "a.jsonl"), "max_dynamic_patch": 1},
            "four": {"root": str(world), "annotation": str(tmp_path / "a.jsonl")}}
    (tmp_path / "meta.json").write_text(json.dumps(meta, indent=1))
    m = build_index([tmp_path / "meta.json"], tmp_path / "idx", layout=image_layout(recipe().model),
                    tokenizer=tiny_tokenizer_dir, progress=False)
    ix = open_index(tmp_path / "idx")
    assert [int(v) for v in ix.record_visual] == [1 * TPT, 3 * TPT] and m["tiles"]["per_image_histogram"] == {"1": 1,
                                                                                                            "3": 1}
    ds = _dataset(tmp_path, tok)
    for i in range(2):
        ids, _, tiles = ds.decoded(i)
        assert ids.size == int(ix.mm_length[i]) and len(tiles) == [1, 3][i]


# ----------------------------------------------------------------------------- samples and batches


def test_loader_rows_match_the_index_and_the_layout(world, tok):
    """Every sample's length is the index's mm_length; each image is one run of tiles x 4
    placeholders; pixel_values holds every tile in order (grid row-major, thumbnail last)."""
    ds = _dataset(world, tok)
    layout = ds.layout
    image_id = ds.image_id
    loader = SFTLoader(ds, _cfg(), batch_size=2, seed=0, rank=0, world_size=1)
    plan = loader.plan(0)
    records, row_starts, batch_starts = plan
    seen = 0
    for j in range(loader.batches_per_epoch(0)):
        batch = loader.build_batch(plan, j)["batch"]
        assert loader.skipped == {} and batch is not None
        ids, seq = batch["input_ids"].numpy(), batch["seq_ids"].numpy()
        at = 0
        for b, r in enumerate(range(int(batch_starts[j]), int(batch_starts[j + 1]))):
            for k, i in enumerate(records[row_starts[r]:row_starts[r + 1]].tolist()):
                where = np.flatnonzero(seq[b] == k)
                assert where.size == int(ds.index.mm_length[i])  # the manifest's length, exactly
                names = KINDS[i % len(KINDS)] or []
                sizes = [SIZES[m] for m in names]
                runs = _image_runs(ids[b, where], image_id)
                assert [n for _, n in runs] == layout.image_tokens(sizes)
                # the sample's tiles: every image cut as InternVL does, under the shared budget
                each = layout.tiling.for_images(max(1, len(names)))
                want = [t for m in names for t in dynamic_tiles(Image.open(world / "img" / f"{m}.png").convert("RGB"),
                                                                 64, each.min_tiles, each.max_tiles, each.thumbnail)]
                n = len(want)
                assert n == sum(layout.tiles(sizes))
                if n:
                    assert torch.equal(batch["pixel_values"][at:at + n], preprocess_batch(want, ds.image_spec))
                at += n
                seen += 1
        assert at == (batch["pixel_values"].shape[0] if "pixel_values" in batch else 0)
    assert seen == int(batch_starts[-1] and row_starts[int(batch_starts[-1])])


def test_the_model_accepts_a_tiled_batch(world, tok):
    from vlmforge.model.build import build_vlm

    cfg = recipe()
    model = build_vlm(cfg.model, tok, seed=0).eval()
    loader = build_sft_loader(cfg, tok, batch_size=2, sft_cfg=_cfg(index=str(world / "idx")), rank=0, world_size=1)
    batch = next(b for b in loader if "pixel_values" in b)
    n_tiles = batch["pixel_values"].shape[0]
    assert int((batch["input_ids"] == ds_id(tok)).sum()) == n_tiles * TPT
    with torch.no_grad():
        logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], position_ids=batch["position_ids"],
                       seq_ids=batch["seq_ids"])
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def ds_id(tok) -> int:
    return int(tok.convert_tokens_to_ids("<image>"))


def test_an_image_wrap_surrounds_each_image_block(world, tmp_path, tok, tiny_tokenizer_dir):
    """start "<img>", end "</img>": their ids around each image's placeholders, labels -100 there;
    with and without tiles."""
    for tiles in ("true", "false"):
        wrap = [f"model.images.tiles={tiles}", "model.images.start=<img>", "model.images.end=</img>"]
        cfg = recipe(*wrap)
        layout = image_layout(cfg.model, tok)
        start, end = wrap_ids(tok, "<img>"), wrap_ids(tok, "</img>")
        assert layout.start_ids == start and layout.end_ids == end and start and end
        out = tmp_path / f"idx-{tiles}"
        build_index([world / "data.jsonl"], out, layout=layout, image_root=world, tokenizer=tiny_tokenizer_dir,
                    progress=False, config=cfg)
        man = json.loads((out / "manifest.json").read_text())
        assert (man["images"]["start"], man["images"]["end"]) == ("<img>", "</img>")
        ds = SFTDataset(out, tok, layout=layout, image_spec=image_preprocess_spec(cfg.model))
        for i in range(len(KINDS)):
            ids, labels, tiles_ = ds.decoded(i)
            sizes = [SIZES[m] for m in KINDS[i] or []]
            assert ids.size == int(ds.index.mm_length[i])
            assert int(ds.index.record_visual[i]) == sum(layout.image_tokens(sizes)) + len(sizes) * (len(start) + len(end))
            runs = _image_runs(ids, ds.image_id)
            assert [n for _, n in runs] == layout.image_tokens(sizes) and len(tiles_) == sum(layout.tiles(sizes))
            for a, n in runs:
                assert tuple(ids[a - len(start):a]) == start and tuple(ids[a + n:a + n + len(end)]) == end
                assert (labels[a - len(start):a + n + len(end)] == IGNORE).all()
    # the index knows its wrap: trained without it (or with another layout) it is refused, naming both
    with pytest.raises(SFTDataError, match=r"wrap ids .* but the recipe's model has one tile per image, 4 tokens"):
        SFTDataset(tmp_path / "idx-false", tok, layout=ImageLayout(TPT), image_spec=image_preprocess_spec(cfg.model))


def test_a_layout_the_index_was_not_built_for_is_refused(world, tmp_path, tok, tiny_tokenizer_dir):
    with pytest.raises(SFTDataError, match=r"built for images as tiles 1\.\.4 of 64 px, thumbnail, 4 tokens per "
                                           r"tile, but the recipe's model has tiles 1\.\.6"):
        _dataset(world, tok, "model.images.max_tiles=6")
    fixed = tmp_path / "fixed"
    build_index([world / "data.jsonl"], fixed, visual_tokens=TPT, image_root=world, tokenizer=tiny_tokenizer_dir,
                progress=False)
    assert "visual_tokens" not in json.loads((fixed / "manifest.json").read_text())["arrays"]
    with pytest.raises(SFTDataError, match="one tile per image, 4 tokens per tile, but the recipe's model has tiles"):
        SFTDataset(fixed, tok, layout=image_layout(recipe().model))
    # a fixed grid recomputes its lengths for another number of tokens per image, as before
    ds = SFTDataset(fixed, tok, layout=ImageLayout(9), image_spec=image_preprocess_spec(recipe().model))
    assert all(ds.decoded(i)[0].size == int(ds.lengths()[i]) for i in range(len(KINDS)))


def test_a_fixed_grid_gives_the_batches_of_the_old_arithmetic(world, tmp_path, tok, tiny_tokenizer_dir):
    """Tiles off: each <image> repeated to 4 ids, one decoded image per <image>, round-robin batches,
    as the code before layouts computed them (written out here)."""
    idx = tmp_path / "fixed"
    cfg = load_recipe("tiny/sft", ["model.projector.pool_size=2"])
    build_index([world / "data.jsonl"], idx, layout=image_layout(cfg.model, tok), image_root=world,
                tokenizer=tiny_tokenizer_dir, progress=False)
    man = json.loads((idx / "manifest.json").read_text())
    assert man["arrays"] == ["offsets", "nbytes", "file_id", "line", "n_images", "has_image", "text_tokens",
                             "mm_length"] and man["tiles"] is None
    spec = image_preprocess_spec(cfg.model)
    ds = SFTDataset(idx, tok, layout=image_layout(cfg.model, tok), image_spec=spec)
    image_id = ds_id(tok)

    def old_sample(i: int) -> dict:
        msgs, images = ds.index.messages(i)
        ids, mask = encode_conversation(tok, msgs)
        ids, mask = np.asarray(ids, np.int64), np.asarray(mask, bool)
        is_img = ids == image_id
        labels = np.where(mask & ~is_img, ids, IGNORE)
        reps = np.where(is_img, TPT, 1)
        ids, labels = np.repeat(ids, reps), np.repeat(labels, reps)
        labels[0] = IGNORE
        assert ids.size == int(ds.index.text_tokens[i]) + int(ds.index.n_images[i]) * (TPT - 1) == int(ds.lengths()[i])
        pix = [Image.open(world / p).convert("RGB") for p in images]
        return {"input_ids": ids, "labels": labels, "pixel_values": preprocess_batch(pix, spec) if pix else None}

    for world_size in (1, 2):
        for rank in range(world_size):
            loader = SFTLoader(ds, _cfg(), batch_size=2, seed=3, rank=rank, world_size=world_size)
            records, row_starts, batch_starts = plan = loader.plan(0)
            for j in range(loader.batches_per_epoch(0)):
                g = j * world_size + rank
                rows = [[old_sample(i) for i in records[row_starts[r]:row_starts[r + 1]]]
                        for r in range(int(batch_starts[g]), int(batch_starts[g + 1]))]
                want, got = collate_packs(rows, tok.pad_token_id), loader.build_batch(plan, j)["batch"]
                assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_version_1_index_reads_as_before(world, tmp_path, tok, tiny_tokenizer_dir):
    """An index from before layouts (version 1: no ``images``, no ``tiles``) is a fixed grid of its
    ``visual_tokens``: the same batches as today's fixed-grid index; a newer version is refused."""
    import shutil

    new, old = tmp_path / "new", tmp_path / "old"
    build_index([world / "data.jsonl"], new, visual_tokens=TPT, image_root=world, tokenizer=tiny_tokenizer_dir,
                progress=False)
    shutil.copytree(new, old)
    man = json.loads((old / "manifest.json").read_text())
    del man["images"], man["tiles"]
    (old / "manifest.json").write_text(json.dumps({**man, "index_version": 1}))
    spec = image_preprocess_spec(recipe().model)
    a, b = (list(SFTLoader(SFTDataset(d, tok, image_spec=spec), _cfg(), batch_size=2, seed=0, rank=0, world_size=1))
            for d in (new, old))
    assert len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert open_index(old).layout == ImageLayout(TPT)
    (old / "manifest.json").write_text(json.dumps({**man, "index_version": 3}))
    with pytest.raises(SFTDataError, match="version 3 is newer"):
        open_index(old)


def test_jpeg_augmentation_re_encodes_each_tile(world, tok):
    """InternVL's order: tile first, then every tile (thumbnail too) at its own drawn quality;
    tile k of sample i in epoch e of seed s: jpeg_quality(s, e, i, k)."""
    ds = _dataset(world, tok, jpeg_augment=True)
    i = 3  # wide (3 tiles) + square (1)
    plain = ds.decoded(i)[2]
    aug = ds.decoded(i, augment=(5, 1))[2]
    assert len(plain) == len(aug) == 4
    for k, (p, a) in enumerate(zip(plain, aug)):
        assert np.array_equal(np.asarray(a), np.asarray(jpeg_reencode(p, jpeg_quality(5, 1, i, k))))
    again = ds.decoded(i, augment=(5, 1))[2]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(aug, again))


# ----------------------------------------------------------------------------- rank balancing


def _samples(batch) -> list[tuple]:
    ids, seq = batch["input_ids"].numpy(), batch["seq_ids"].numpy()
    return [tuple(ids[b, seq[b] == k]) for b in range(ids.shape[0]) for k in range(int(seq[b].max()) + 1)]


def _steps(ds, world_size: int, micro: int, batch: int = 2, **cfg) -> list[list[tuple]]:
    """Per optimizer step: the sorted samples of all ranks' micro-batches."""
    loaders = [SFTLoader(ds, _cfg(**cfg), batch_size=batch, seed=1, rank=r, world_size=world_size,
                         balance_micro_steps=micro) for r in range(world_size)]
    per_rank = [list(lo) for lo in loaders]
    n = len(per_rank[0])
    assert n == loaders[0].batches_per_epoch(0) and n % micro == 0
    return [sorted(s for r in range(world_size) for b in per_rank[r][a:a + micro] for s in _samples(b))
            for a in range(0, n, micro)]


@pytest.mark.parametrize("batching", ["pack", "length_group"])
def test_balanced_steps_hold_the_same_rows_on_one_rank_or_two(world, tok, batching):
    ds = _dataset(world, tok)
    one = _steps(ds, 1, 2, batching=batching)
    two = _steps(ds, 2, 1, batching=batching)
    assert one == two and len(one) >= 2


def test_balanced_ranks_take_the_slots_of_balanced_plan(world, tok):
    """Rank r's micro-batch a of step s is the rows balanced_plan puts at [s, r, a] (vision tokens:
    its records' visual_tokens, LLM tokens: their mm_length), in slot order; the epoch's rows are
    the plan's, cut into whole steps of world x micro_steps x batch rows."""
    ds = _dataset(world, tok)
    world_size, micro, bs = 2, 2, 1
    loaders = [SFTLoader(ds, _cfg(), batch_size=bs, seed=2, rank=r, world_size=world_size, balance_micro_steps=micro)
               for r in range(world_size)]
    records, row_starts, batch_starts = SFTLoader(ds, _cfg(), batch_size=bs, seed=2, rank=0, world_size=1).plan(0)
    vis = np.asarray(ds.visual_lengths(), np.int64)
    llm = np.asarray(ds.lengths(), np.int64)
    rows = range(row_starts.size - 1)
    v = np.array([vis[records[row_starts[r]:row_starts[r + 1]]].sum() for r in rows])
    t = np.array([llm[records[row_starts[r]:row_starts[r + 1]]].sum() for r in rows])
    g = world_size * micro * bs
    steps = int(batch_starts[-1]) // g
    slots = balanced_plan(v, t, np.arange(steps * g), world_size, micro, bs)
    assert v.std() > 0  # rows differ in vision tokens: there is something to balance
    for r, lo in enumerate(loaders):
        assert lo.batches_per_epoch(0) == steps * micro
        got = [_samples(b) for b in lo]
        for s in range(steps):
            for a in range(micro):
                want = [tuple(ds.decoded(int(i))[0]) for row in slots[s, r, a]
                        for i in records[row_starts[row]:row_starts[row + 1]]]
                assert got[s * micro + a] == want


def test_balanced_loader_resumes_exactly_and_workers_agree(world, tok):
    ds = _dataset(world, tok)

    def loader(**kw):  # one record per row: 24 rows, 3 steps of 2 ranks x 2 micro-steps x 2 rows
        return SFTLoader(ds, _cfg(batching="length_group", **kw), batch_size=2, seed=4, rank=1, world_size=2, balance_micro_steps=2)

    full = [b["input_ids"] for b in loader()]
    first = loader()
    it = iter(first)
    next(it), next(it), next(it)
    state = first.state_dict()
    assert state["balance_micro_steps"] == 2
    again = loader()
    again.set_epoch(state["epoch"])
    again.load_state_dict(state)
    rest = [b["input_ids"] for b in again]
    assert len(full) == 6 and len(rest) == len(full) - 3 and all(torch.equal(a, b) for a, b in zip(rest, full[3:]))
    with pytest.raises(SFTDataError, match="balance_micro_steps"):
        SFTLoader(ds, _cfg(batching="length_group"), batch_size=2, seed=4, rank=1, world_size=2).load_state_dict(state)
    workers = [b["input_ids"] for b in loader(num_workers=2)]
    assert len(workers) == len(full) and all(torch.equal(a, b) for a, b in zip(workers, full))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_balanced_loader_plans_only_the_steps_it_reads_once_each(world, tok, workers):
    ds = _dataset(world, tok)

    def loader():  # 24 rows: 3 steps of 2 ranks x 2 micro-steps x 2 rows
        return SFTLoader(ds, _cfg(batching="length_group", num_workers=workers), batch_size=2, seed=4, rank=1,
                         world_size=2, balance_micro_steps=2)

    full = [b["input_ids"] for b in loader()]
    lo = loader()
    lo.load_state_dict({**lo.state_dict(), "batch": 2})  # resume at step 1 of 3
    count = CountSteps(lo.plan(0)[3])
    got = [b["input_ids"] for b in lo]
    assert len(full) == 6 and len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, full[2:]))
    assert count.calls == 2  # steps 1 and 2 once each, in the main process (not once per worker); step 0 never


def test_balancing_off_is_the_round_robin_split(world, tok):
    ds = _dataset(world, tok)
    plain = list(SFTLoader(ds, _cfg(), batch_size=2, seed=1, rank=1, world_size=2))
    off = list(SFTLoader(ds, _cfg(), batch_size=2, seed=1, rank=1, world_size=2, balance_micro_steps=None))
    assert len(plain) == len(off) and all(torch.equal(a[k], b[k]) for a, b in zip(plain, off) for k in a)


# ----------------------------------------------------------------------------- training


def test_a_tiny_tiled_sft_run_trains(world, tmp_path, tiny_tokenizer_dir, capsys):
    from vlmforge.cli import main

    sets = [f"sft.index={world / 'idx'}", f"train.run_dir={tmp_path / 'run'}", f"tokenizer.path={tiny_tokenizer_dir}",
            "train.progress_bar=false", "train.tensorboard=false", "train.report=false", "train.micro_batch_size=2",
            "train.global_batch_size=2", "train.max_steps=3", "train.checkpoint_every=100", "train.init_from=null",
            "sft.max_len=200", *TILED]
    assert main(["train", "--recipe", "tiny/sft", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    # trained with another tile budget than the index's: refused, naming both layouts
    capsys.readouterr()
    sets[1] = f"train.run_dir={tmp_path / 'other'}"
    assert main(["train", "--recipe", "tiny/sft", *[a for s in sets for a in ("--set", s)],
                 "--set", "model.images.max_tiles=2"]) == 2
    assert "tiles 1..4" in capsys.readouterr().err
