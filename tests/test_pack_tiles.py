"""`vlmforge pack` and the pretraining loader under an image layout (InternVL tiles, <img> wrap),
and the loader's rank balancing (contract T2)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from fixtures_model import tiny_model
from fixtures_tokenizer import shape_sentences
from fixtures_train import CountSteps, one_torch_thread
from PIL import Image

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.data.balance import balanced_plan
from vlmforge.data.pretrain.loader import PackedDataError, PackedDataset, PackedLoader, recipe_layout
from vlmforge.data.pretrain.packed_shards import PackedShardReader, list_packed_shards
from vlmforge.data.pretrain.plan import pack_shards
from vlmforge.imagedecode import decode_image
from vlmforge.images import preprocess_batch, tile_images
from vlmforge.shards import ShardWriter
from vlmforge.text.tokenization import load_tokenizer

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_torch_thread)

# tiny/model: 64 px tiles, 16 tokens per tile. Tiles per image with max_tiles=4 and the thumbnail
# (grids 1x1 1x2 2x1 1x3 3x1 1x4 2x2 4x1; aspect nearest wins, an exact tie goes to the larger grid
# only when the image covers more than half its area):
#   64x64, 40x40: aspect 1 -> 1x1 (tied with 2x2, but 2 * 64 * 64 < 64^2 * 4): 1 tile, no thumbnail
#   128x64: aspect 2 -> 2x1 + thumbnail = 3;    64x128: 1x2 + thumbnail = 3
#   256x64: aspect 4 -> 4x1 + thumbnail = 5;    60x200: aspect 0.3, nearest 1/3 -> 1x3 + thumbnail = 4
TILES_OF = {(64, 64): 1, (40, 40): 1, (128, 64): 3, (64, 128): 3, (256, 64): 5, (60, 200): 4}
SIZES = list(TILES_OF)
N = 48
BASE = ["model.projector.pool_size=4", "pack.max_len=160", "pack.window=24", "seed=3"]
TILED = BASE + ["model.images.tiles=true", "model.images.max_tiles=4"]
WRAPPED = TILED + ["model.images.start=<img>", "model.images.end=</img>"]


def _image(i: int, size: tuple[int, int]) -> bytes:
    arr = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG" if i % 2 else "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tile_captions")
    caps = shape_sentences(N, seed=11)
    with ShardWriter(out, samples_per_shard=20, timestamps=False) as w:
        for i in range(N):
            w.write(w.next_key(), _image(i, SIZES[i % len(SIZES)]), caps[i], {})
    return str(out)


def _pack(shards, tok, out, overrides, **kw):
    cfg = load_recipe(None, list(overrides))
    return pack_shards(cfg, [shards], out, tok, progress=False, **kw), cfg


@pytest.fixture(scope="module")
def tiled(shards, tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled")
    manifest, cfg = _pack(shards, tiny_tokenizer_dir, out, TILED)
    return str(out), manifest, cfg


def _packs(folder):
    for p in list_packed_shards(folder):
        r = PackedShardReader(p)
        for j in range(len(r)):
            yield r.read_pack(j)


def _size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_pack_lengths_count_each_images_tiles(tiled):
    folder, manifest, _ = tiled
    seen = 0
    for meta, _tokens, images in _packs(folder):
        image_samples = [s for s in meta["samples"] if s["kind"] == "image"]
        assert len(image_samples) == len(images)
        for s, data in zip(image_samples, images):
            assert tuple(s["size"]) == _size_of(data) and s["tiles"] == TILES_OF[_size_of(data)]
        expect = sum(s["n_text"] + 1 + 16 * s["tiles"] for s in image_samples)
        assert meta["length"] == expect <= 160
        assert meta["tiles"] == sum(s["tiles"] for s in image_samples)
        assert meta["image_tokens"] == 16 * meta["tiles"]
        seen += len(image_samples)
    assert seen == N == manifest["counts"]["samples_packed"]
    # the index holds each pack's tiles and image tokens (what the balancer reads) in format 2
    for p in list_packed_shards(folder):
        index = json.loads(p.read_text())
        assert index["format"] == 2 and all({"tiles", "image_tokens"} <= set(e) for e in index["packs"])
    stats = manifest["images"]
    per_size = N // len(SIZES)
    assert stats["tiles_per_image"]["histogram"] == {"1": 2 * per_size, "3": 2 * per_size, "4": per_size, "5": per_size}
    assert stats["tiles"] == per_size * sum(TILES_OF.values()) and stats["tiles_per_image"]["max"] == 5
    assert stats["visual_tokens"]["per_image_max"] == 80 and stats["visual_tokens"]["total"] == 16 * stats["tiles"]
    rec = manifest["geometry"]["images"]
    assert rec == {"tiles": True, "tokens_per_tile": 16, "tile": 64, "min_tiles": 1, "max_tiles": 4, "thumbnail": True, "share_budget": True,
                   "start": None, "end": None, "start_ids": [], "end_ids": []}


def test_loader_placeholders_and_pixel_rows_follow_the_tiles(tiled, tiny_tokenizer_dir):
    folder, _, cfg = tiled
    tok = load_tokenizer(tiny_tokenizer_dir)
    ds = PackedDataset(folder, visual_tokens=16, expected_layout=recipe_layout(cfg, tok))
    assert ds.layout.tiling is not None and ds.layout.tiling.max_tiles == 4
    for i in range(len(ds)):
        meta, _, images = ds.readers[0].read_pack(i) if i < len(ds.readers[0]) else (None, None, None)
        samples = ds[i]
        tiles = [int(s["pixel_values"].shape[0]) for s in samples if "pixel_values" in s]
        placeholders = [int((s["input_ids"] == ds.image_token_id).sum()) for s in samples if "pixel_values" in s]
        assert placeholders == [16 * t for t in tiles]
        if meta is not None:
            assert tiles == [s["tiles"] for s in meta["samples"] if s["kind"] == "image"]
            # the pixel rows are tile_images' tiles, preprocessed, in order (thumbnail last)
            want = preprocess_batch([t for b in images for t in tile_images([decode_image(b)], ds.layout)],
                                    ds.image_spec)
            assert torch.equal(torch.cat([s["pixel_values"] for s in samples]), want)
    loader = PackedLoader(ds, batch_size=2, seed=0, rank=0, world_size=1, pad_to=ds.max_len)
    workers = PackedLoader(ds, batch_size=2, seed=0, rank=0, world_size=1, pad_to=ds.max_len, num_workers=1)
    for a, b in zip(loader, workers):
        assert a["pixel_values"].shape[0] == int((a["input_ids"] == ds.image_token_id).sum()) // 16
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_forward_takes_a_tiled_batch(tiled, tiny_tokenizer_dir):
    folder, _, cfg = tiled
    tok = load_tokenizer(tiny_tokenizer_dir)
    model = tiny_model(tok, *TILED)
    batch = next(iter(PackedLoader(folder, cfg, tokenizer=tok, batch_size=2, seed=0, rank=0, world_size=1)))
    assert batch["pixel_values"].shape[0] > 2  # more tiles than images
    with torch.no_grad():
        logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], position_ids=batch["position_ids"],
                       seq_ids=batch["seq_ids"])
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_wrap_adds_its_tokens_and_no_loss_on_them(shards, tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    start, end = tok.encode("<img>", add_special_tokens=False), tok.encode("</img>", add_special_tokens=False)
    wrap = len(start) + len(end)
    manifest, cfg = _pack(shards, tiny_tokenizer_dir, tmp_path / "w", WRAPPED)
    assert manifest["geometry"]["images"]["start_ids"] == start and manifest["geometry"]["images"]["end_ids"] == end
    for meta, _, _ in _packs(tmp_path / "w"):
        s = [x for x in meta["samples"] if x["kind"] == "image"]
        assert meta["length"] == sum(x["n_text"] + 1 + 16 * x["tiles"] + wrap for x in s)
        assert meta["image_tokens"] == 16 * meta["tiles"] + wrap * len(s)
    ds = PackedDataset(str(tmp_path / "w"), visual_tokens=16, expected_layout=recipe_layout(cfg, tok))
    sample = ds[0][0]
    n = int(sample["pixel_values"].shape[0]) * 16
    head = [*start, *[ds.image_token_id] * n, *end]
    assert sample["input_ids"][: len(head)].tolist() == head
    assert (sample["labels"][: len(head)] == -100).all() and (sample["labels"][len(head):] != -100).all()
    # without a tokenizer the wrap is compared by its text; the loader then checks the ids
    PackedLoader(str(tmp_path / "w"), cfg, tokenizer=tok, batch_size=1, seed=0, rank=0, world_size=1)
    PackedDataset(str(tmp_path / "w"), expected_layout=recipe_layout(cfg))


def test_a_pack_of_another_layout_is_refused_naming_both(tiled, shards, tiny_tokenizer_dir, tmp_path):
    folder, _, cfg = tiled
    fixed = load_recipe(None, BASE)
    with pytest.raises(PackedDataError, match=r"packed with image layout \[tiles 1\.\.4 of 64 px, thumbnail, 16 tokens "
                                              r"per tile\] but the recipe's model has \[one tile per image, 16 tokens "
                                              r"per tile\]"):
        PackedDataset(folder, expected_layout=recipe_layout(fixed))
    other = load_recipe(None, TILED + ["model.images.max_tiles=6"])
    with pytest.raises(PackedDataError, match="tiles 1..6 of 64 px"):
        PackedLoader(folder, other, batch_size=1, seed=0, rank=0, world_size=1)
    _pack(shards, tiny_tokenizer_dir, tmp_path / "fixed", BASE)
    with pytest.raises(PackedDataError, match=r"\[one tile per image, 16 tokens per tile\] but the recipe's model has \[tiles"):
        PackedDataset(str(tmp_path / "fixed"), expected_layout=recipe_layout(cfg))
    wrapped = load_recipe(None, WRAPPED)
    with pytest.raises(PackedDataError, match="wrapped in '<img>' / '</img>'"):
        PackedDataset(folder, expected_layout=recipe_layout(wrapped))


def test_fixed_grid_pack_is_the_format_of_before(shards, tiny_tokenizer_dir, tmp_path):
    """With tiles off (and no wrap) the other model.images keys change nothing: the same bytes, format 1,
    no per-image sizes or tiles, no layout in the manifest (the byte-for-byte check against the code before
    the layout existed is the unchanged tests/test_packed.py)."""
    a, _ = _pack(shards, tiny_tokenizer_dir, tmp_path / "a", BASE)
    b, _ = _pack(shards, tiny_tokenizer_dir, tmp_path / "b", BASE + ["model.images.max_tiles=4",
                                                                     "model.images.thumbnail=false"])
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix in (".tar", ".json") and p.stem != "manifest")
    assert names and all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    assert "images" not in a and "images" not in a["geometry"]
    for p in list_packed_shards(tmp_path / "a"):
        index = json.loads(p.read_text())
        assert index["format"] == 1 and all(set(e) == {"key", "length", "samples", "json", "tokens", "images"}
                                            for e in index["packs"])
    for meta, _, _ in _packs(tmp_path / "a"):
        assert set(meta) == {"length", "visual_tokens", "samples"}
        assert all(set(s) == {"key", "kind", "n_text", "images", "sep", "truncated"} for s in meta["samples"])
        assert meta["length"] == sum(s["n_text"] + 1 + 16 for s in meta["samples"])
    # the balancer's loads of a fixed-grid folder: images x visual tokens, and the pack lengths
    vision, llm = PackedDataset(str(tmp_path / "a")).pack_loads()
    metas = [m for m, _, _ in _packs(tmp_path / "a")]
    assert vision.tolist() == [16 * len(m["samples"]) for m in metas] and llm.tolist() == [m["length"] for m in metas]


def test_no_image_check_reads_the_size_from_the_header(shards, tiny_tokenizer_dir, tmp_path, tiled):
    _, manifest, _ = tiled
    fast, _ = _pack(shards, tiny_tokenizer_dir, tmp_path / "h", TILED + ["pack.check_images=false"])
    assert fast["images"] == manifest["images"] and fast["fill"] == manifest["fill"]


def test_an_image_too_big_for_max_len_is_dropped_and_counted(shards, tiny_tokenizer_dir, tmp_path):
    # max_len 80: 256x64 needs 5 tiles = 80 tokens, no room for a caption
    manifest, _ = _pack(shards, tiny_tokenizer_dir, tmp_path / "t", TILED + ["pack.max_len=80"])
    assert manifest["dropped"] == {"image_too_long": N // len(SIZES)}
    assert manifest["images"]["tiles_per_image"]["max"] == 4


def test_pretraining_steps_on_tiled_packs_via_the_cli(tiled, tiny_tokenizer_dir, tmp_path):
    from vlmforge.files import read_metrics

    folder, _, _ = tiled
    sets = [f"train.data_path={folder}", f"tokenizer.path={tiny_tokenizer_dir}", f"train.run_dir={tmp_path / 'run'}",
            "train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=4", "train.progress_bar=false",
            "train.tensorboard=false", "model.images.tiles=true", "model.images.max_tiles=4", "pack.max_len=160"]
    assert main(["train", "--recipe", "tiny/pretrain", *sum((["--set", s] for s in sets), [])]) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


# -------------------------------------------------------------------------- rank balancing (T2)


def _plans(ds, world, micro_steps, bs, seed=5, **kw):
    return [PackedLoader(ds, batch_size=bs, seed=seed, rank=r, world_size=world, balance_micro_steps=micro_steps,
                         **kw).epoch_plan(0) for r in range(world)]


def _steps(plans, micro_steps):
    """[steps][rank] -> the pack ids of that rank in that step."""
    return [[p[s * micro_steps:(s + 1) * micro_steps].ravel().tolist() for p in plans]
            for s in range(plans[0].shape[0] // micro_steps)]


@pytest.fixture(scope="module")
def tiled_ds(tiled):
    return PackedDataset(tiled[0], visual_tokens=16)


def test_pack_loads_come_from_the_index(tiled_ds):
    vision, llm = tiled_ds.pack_loads()
    metas = [m for m, _, _ in _packs(tiled_ds.folder)]
    assert vision.tolist() == [m["image_tokens"] for m in metas] and llm.tolist() == [m["length"] for m in metas]
    assert len(set(vision.tolist())) > 2  # loads that differ: something to balance


@pytest.mark.parametrize("bs", [1, 2])
def test_one_rank_two_micro_steps_trains_the_packs_of_two_ranks_one_micro_step(tiled_ds, bs):
    one = _steps(_plans(tiled_ds, 1, 2, bs), 2)
    two = _steps(_plans(tiled_ds, 2, 1, bs), 1)
    assert len(one) == len(two) > 1
    for a, b in zip(one, two):
        assert sorted(a[0]) == sorted(b[0] + b[1])
    # and these are the steps of the seeded epoch order, as without balancing (only the deal changes)
    off = [PackedLoader(tiled_ds, batch_size=bs, seed=5, rank=r, world_size=2).epoch_plan(0) for r in range(2)]
    n = len(tiled_ds)
    order = np.resize(np.random.default_rng([5, 0]).permutation(n), len(one) * 2 * bs)
    for s, a in enumerate(one):
        assert sorted(a[0]) == sorted(order[s * 2 * bs:(s + 1) * 2 * bs].tolist())
    if n % (2 * bs) == 0:
        assert sorted(np.concatenate([p.ravel() for p in off]).tolist()) == sorted(order.tolist())


def test_balanced_deal_is_the_plan_of_vlmforge_data_balance(tiled_ds):
    world, m, bs = 2, 2, 1
    plans = _plans(tiled_ds, world, m, bs)
    vision, llm = tiled_ds.pack_loads()
    n, g = len(tiled_ds), world * m * bs
    steps = -(-n // g)
    order = np.resize(np.random.default_rng([5, 0]).permutation(n), steps * g)
    want = balanced_plan(vision, llm, order, world, m, bs)
    for r in range(world):
        np.testing.assert_array_equal(plans[r], want[:, r].reshape(-1, bs))
    # the slowest rank's vision work per step is no worse than the round-robin split's
    rr = [PackedLoader(tiled_ds, batch_size=bs, seed=5, rank=r, world_size=world).epoch_plan(0) for r in range(world)]
    n_rr = rr[0].shape[0] // m * m

    def worst(ps, count):
        return sum(max(vision[p[s:s + m]].sum() for p in ps) for s in range(0, count, m))
    assert worst(plans, n_rr) <= worst(rr, n_rr)  # the same steps: the first n_rr // m of the order


def test_balanced_loader_resumes_exactly(tiled_ds):
    def make():
        return PackedLoader(tiled_ds, batch_size=1, seed=7, rank=1, world_size=2, balance_micro_steps=2)

    ref = make()
    full = [b["input_ids"] for b in ref] + [b["input_ids"] for b in ref]  # two epochs
    assert len(full) == 2 * len(make()) and len(make()) % 2 == 0  # whole optimizer steps per epoch
    for stop in (1, 3, len(full) // 2):
        a = make()
        it = iter(a)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(a.state_dict()))
        del it
        b = make()
        b.load_state_dict(state)
        rest = [x["input_ids"] for x in b] + [x["input_ids"] for x in b]  # the epoch's rest (maybe none), the next
        assert len(rest) == len(full) - stop and all(torch.equal(x, y) for x, y in zip(rest, full[stop:]))
    with pytest.raises(PackedDataError, match="balance_micro_steps=2 but this run has None"):
        PackedLoader(tiled_ds, batch_size=1, seed=7, rank=1, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_balanced_loader_plans_only_the_steps_it_reads_once_each(tiled_ds, workers):
    def make():
        return PackedLoader(tiled_ds, batch_size=1, seed=7, rank=1, world_size=2, balance_micro_steps=2,
                            num_workers=workers)

    full = [b["input_ids"] for b in make()]
    lo = make()
    lo.load_state_dict({**lo.state_dict(), "batch": 2})  # resume at step 1 of the epoch
    count = CountSteps(lo.step_planner(0))
    got = [b["input_ids"] for b in lo]
    assert len(got) == len(full) - 2 and all(torch.equal(x, y) for x, y in zip(got, full[2:]))
    assert count.calls == len(full) // 2 - 1  # steps 1.. once each (in the main process), step 0 never


def test_balancing_off_is_todays_loader(tiled_ds):
    n = len(tiled_ds)
    off = PackedLoader(tiled_ds, batch_size=2, seed=5, rank=1, world_size=2)
    order = np.resize(np.random.default_rng([5, 0]).permutation(n), off.batches_per_epoch() * 4)
    np.testing.assert_array_equal(off.epoch_plan(0), order.reshape(-1, 2, 2)[:, 1])
    assert set(off.state_dict()) == {"epoch", "batch", "seed", "num_packs", "world_size", "batch_size"}
    drop = PackedLoader(tiled_ds, batch_size=1, seed=5, rank=0, world_size=2, balance_micro_steps=2, remainder="drop")
    assert drop.batches_per_epoch() == n // 4 * 2


def test_a_folder_is_read_with_its_own_layout_when_none_is_asked(tiled):
    ds = PackedDataset(tiled[0])
    assert ds.records_sizes and ds.layout.tiling.max_tiles == 4 and ds.layout.tokens_per_tile == 16
