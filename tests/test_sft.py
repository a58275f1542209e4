"""SFT index (json / jsonl, bad input, staleness) and SFT samples / batches (packing, resume, ranks)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from fixtures_tokenizer import COLOURS, SHAPES

from vlmforge.arch.tokens import IM_END
from vlmforge.config.sft import SFTDataConfig
from vlmforge.data.collate import IGNORE_INDEX as IGNORE
from vlmforge.data.collate import collate_packs
from vlmforge.data.sft.build import build_index
from vlmforge.data.sft.index import open_index
from vlmforge.data.sft.loader import SFTLoader, epoch_plan
from vlmforge.data.sft.records import SFTDataError
from vlmforge.data.sft.samples import SFTDataset
from vlmforge.data.sft.scan import scan_records
from vlmforge.text.tokenization import load_tokenizer

VT = 4  # visual tokens per image in these tests
SPEC = dict(size=8, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], rescale=1 / 255)


def make_records(n: int, seed: int = 0) -> list[dict]:
    """LLaVA records: single image, two images, text-only, multi-turn, awkward JSON strings."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        c, s = rng.choice(COLOURS), rng.choice(SHAPES)
        kind = i % 4
        turns = [
            {"from": "human", "value": f"What colour is the {s}?"},
            {"from": "gpt", "value": f"The {s} is {c}."},
        ]
        rec: dict = {"id": f"r{i}"}
        if kind == 0:
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
            rec["image"] = f"img/{i % 7}.png"
        elif kind == 1:
            turns[0]["value"] = "<image> and <image>: same " + s + '? "quoted" \\ back\\slash {[]} é'
            rec["image"] = [f"img/{i % 7}.png", f"img/{(i + 1) % 7}.png"]
        elif kind == 2:
            turns += [{"from": "human", "value": "And the size?"}, {"from": "gpt", "value": "It is small."}]
        else:
            turns.insert(0, {"from": "system", "value": "Answer briefly."})
        rec["conversations"] = turns
        recs.append(rec)
    return recs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("sft")
    (d / "img").mkdir()
    for k in range(7):
        Image.new("RGB", (12, 10), (30 * k, 200 - 20 * k, 90)).save(d / "img" / f"{k}.png")
    recs = make_records(120)
    (d / "data.json").write_text(json.dumps(recs, indent=2, ensure_ascii=False))
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d, recs


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def exact_index(world, tiny_tokenizer_dir, tmp_path_factory):
    d, _ = world
    out = tmp_path_factory.mktemp("idx")
    build_index(
        [d / "data.jsonl"], out, visual_tokens=VT, image_root=d, tokenizer=tiny_tokenizer_dir, lengths="exact", progress=False
    )
    return out


# ----------------------------------------------------------------------------- index


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_index_returns_same_record_as_plain_json(world, tmp_path, name):
    d, recs = world
    m = build_index([d / name], tmp_path / "i", visual_tokens=VT, image_root=d, lengths="estimate", progress=False)
    assert m["counts"]["records"] == len(recs) and m["dropped"] == {}
    plain = json.loads((d / "data.json").read_text())
    ix = open_index(tmp_path / "i")
    rng = random.Random(1)
    for i in rng.sample(range(len(recs)), 60) + [0, len(recs) - 1]:
        assert ix.record(i) == plain[i]
    assert ix.offsets.dtype == np.uint64 and not ix.offsets.flags.owndata  # a view of the memory map
    with pytest.raises(IndexError):
        ix.record(len(recs))
    n_img = np.array([len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r) for r in recs])
    assert (np.asarray(ix.n_images) == n_img).all()
    assert (np.asarray(ix.has_image) == (n_img > 0)).all()
    assert m["counts"]["text_only"] == int((n_img == 0).sum())


def test_json_array_scan_is_chunk_independent(world, monkeypatch):
    """The vectorised array scanner carries string/escape/depth state across chunk borders."""
    from vlmforge.data.sft import scan

    d, recs = world
    ref = scan_records(str(d / "data.json"))
    monkeypatch.setattr(scan, "_JSON_CHUNK", 29)
    small = scan_records(str(d / "data.json"))
    for a, b in zip(ref, small):
        assert (a == b).all()
    text = (d / "data.json").read_bytes()
    off, nb, line = ref
    assert json.loads(text[off[5] : off[5] + nb[5]]) == recs[5]
    assert text[: off[5]].count(b"\n") + 1 == line[5]


def test_exact_lengths_match_samples(exact_index, tok, world):
    d, recs = world
    ix = open_index(exact_index)
    ds = SFTDataset(ix, tok, image_spec=SPEC)
    for i in [0, 1, 2, 3, 17, 50]:
        s = ds[i]
        assert s["input_ids"].size == int(ix.mm_length[i])
        n_img = int(ix.n_images[i])
        assert (s["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum() == n_img * VT
        if n_img:
            assert tuple(s["pixel_values"].shape) == (n_img, 3, 8, 8)
        else:
            assert s["pixel_values"] is None


def test_sample_labels_only_on_assistant_replies(exact_index, tok):
    ds = SFTDataset(exact_index, tok, image_spec=SPEC)
    for i in (0, 2, 3):  # image, multi-turn, system prompt
        s = ds[i]
        ids, labels = s["input_ids"], s["labels"]
        assert labels[0] == IGNORE and ids.dtype == np.int64
        sup = labels != IGNORE
        assert (labels[sup] == ids[sup]).all()
        runs, cur = [], []
        for t, m in zip(ids, sup):
            if m:
                cur.append(int(t))
            elif cur:
                runs.append(tok.decode(cur))
                cur = []
        msgs = ds.index.messages(i)[0]
        assert runs == [m["content"] + IM_END for m in msgs if m["role"] == "assistant"]


def test_bad_input_skipped_and_counted(world, tmp_path, tiny_tokenizer_dir):
    d, recs = world
    good = [json.dumps(r) for r in recs[:6]]
    lines = good[:2] + ["{not json", ""] + good[2:4]
    lines.append(json.dumps({"image": "img/missing.png", "conversations": recs[0]["conversations"]}))
    lines.append(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}))
    lines.append(json.dumps({"image": "img/1.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]}))
    lines.append(json.dumps({"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]}))
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    m = build_index([src], tmp_path / "i", visual_tokens=VT, image_root=d, tokenizer=tiny_tokenizer_dir, progress=False)
    assert m["counts"]["records"] == 5
    assert m["dropped"] == {"json_error": 1, "missing_image": 1, "no_assistant_turn": 1, "image_token_mismatch": 1}
    ex = m["dropped_examples"]["json_error"][0]
    assert ex["line"] == 3 and ex["file"].endswith("bad.jsonl") and "parse" in ex["error"]
    assert m["dropped_examples"]["missing_image"][0]["line"] == 7
    ix = open_index(tmp_path / "i")
    assert ix.record(4) == json.loads(lines[-1]) and not ix.has_image[4]
    with pytest.raises(SFTDataError, match=r"bad\.jsonl:3: json_error"):
        build_index([src], tmp_path / "j", visual_tokens=VT, image_root=d, lengths="estimate", strict=True, progress=False)


def test_truncated_json_array_is_a_clear_error(world, tmp_path):
    d, _ = world
    bad = tmp_path / "cut.json"
    bad.write_bytes((d / "data.json").read_bytes()[:3000])
    with pytest.raises(SFTDataError, match="cut.json.*truncated"):
        build_index([bad], tmp_path / "i", visual_tokens=VT, lengths="estimate", progress=False)


def test_stale_index_is_refused(world, tmp_path):
    d, recs = world
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs[:5]))
    build_index([src], tmp_path / "i", visual_tokens=VT, lengths="estimate", progress=False)
    open_index(tmp_path / "i")
    src.write_text("".join(json.dumps(r) + "\n" for r in recs[:6]))
    with pytest.raises(SFTDataError, match="stale"):
        open_index(tmp_path / "i")


def test_estimated_lengths_are_close_and_parallel_build_matches(world, tmp_path, tiny_tokenizer_dir, exact_index):
    d, _ = world
    m = build_index(
        [d / "data.json", d / "data.jsonl"], tmp_path / "e", visual_tokens=VT, image_root=d,
        tokenizer=tiny_tokenizer_dir, lengths="estimate", workers=2, records_per_job=50, progress=False,
    )
    assert m["counts"]["records"] == 240
    est = open_index(tmp_path / "e")
    ex = open_index(exact_index)
    rel = np.abs(est.mm_length[120:].astype(float) - ex.mm_length) / ex.mm_length
    assert rel.mean() < 0.25
    assert (est.file_id[:120] == 0).all() and (est.file_id[120:] == 1).all()
    assert est.record(130) == est.record(10)


# ----------------------------------------------------------------------------- batches


def _cfg(**kw):
    c = SFTDataConfig(max_len=128, pack_window=50)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


BATCH = 3  # rows per batch in these tests (the trainer passes train.micro_batch_size)


def _unpack(tok, batch):
    """Split a batch into its samples' token id tuples, checking the contract on the way."""
    out = []
    ids, seq, pos, lab = (batch[k].numpy() for k in ("input_ids", "seq_ids", "position_ids", "labels"))
    for b in range(ids.shape[0]):
        for k in range(seq[b].max() + 1):
            where = np.flatnonzero(seq[b] == k)
            assert (np.diff(where) == 1).all()  # a sample is contiguous: never split
            assert (pos[b, where] == np.arange(where.size)).all()
            assert lab[b, where[0]] == IGNORE
            out.append(tuple(ids[b, where]))
        pad = seq[b] == -1
        assert (ids[b, pad] == tok.pad_token_id).all() and (lab[b, pad] == IGNORE).all()
    return out


def test_packed_epoch_covers_every_conversation_once(exact_index, tok):
    ds = SFTDataset(exact_index, tok, image_spec=SPEC)
    loader = SFTLoader(ds, _cfg(drop_last=False), batch_size=BATCH, seed=3, rank=0, world_size=1)
    seen, n_img = [], 0
    for batch in loader:
        assert batch["input_ids"].shape[1] <= 128
        seen += _unpack(tok, batch)
        k = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        assert int((batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == k * VT
        n_img += k
    expected = sorted(tuple(ds[i]["input_ids"]) for i in range(len(ds)))
    assert sorted(seen) == expected
    assert n_img == int(np.asarray(ds.index.n_images).sum())


def test_images_follow_order_of_appearance(exact_index, tok):
    ds = SFTDataset(exact_index, tok, image_spec=SPEC)
    recs, row_starts, batch_starts = epoch_plan(ds.lengths(), _cfg(), 0, 0, batch_size=BATCH)
    rows = [[ds[int(i)] for i in recs[row_starts[r] : row_starts[r + 1]]] for r in range(batch_starts[0], batch_starts[1])]
    batch = collate_packs(rows, tok.pad_token_id)
    expect = [s["pixel_values"] for row in rows for s in row if s["pixel_values"] is not None]
    import torch

    assert torch.equal(batch["pixel_values"], torch.cat(expect))


def test_deterministic_and_exact_resume(exact_index, tok):
    ds = SFTDataset(exact_index, tok, image_spec=SPEC)

    def take(loader, n):
        it = loader.forever()
        return [next(it)["input_ids"] for _ in range(n)]

    ref = take(SFTLoader(ds, _cfg(), batch_size=BATCH, seed=5, rank=0, world_size=1), 12)  # crosses an epoch boundary
    again = take(SFTLoader(ds, _cfg(), batch_size=BATCH, seed=5, rank=0, world_size=1), 12)
    assert all((a == b).all() for a, b in zip(ref, again))
    other = take(SFTLoader(ds, _cfg(), batch_size=BATCH, seed=6, rank=0, world_size=1), 3)
    assert not all(a.shape == b.shape and (a == b).all() for a, b in zip(ref, other))
    first = SFTLoader(ds, _cfg(), batch_size=BATCH, seed=5, rank=0, world_size=1)
    it = first.forever()
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (no pickle)
    resumed = SFTLoader(ds, _cfg(), batch_size=BATCH, seed=5, rank=0, world_size=1)
    resumed.load_state_dict(state)
    rest = take(resumed, 5)
    assert all((a == b).all() for a, b in zip(ref[7:], rest))


def test_ranks_split_the_batches(exact_index, tok):
    ds = SFTDataset(exact_index, tok, image_spec=SPEC)
    cfg = _cfg()
    one = [b["input_ids"] for b in SFTLoader(ds, cfg, batch_size=BATCH, seed=1, rank=0, world_size=1)]
    r0 = [b["input_ids"] for b in SFTLoader(ds, cfg, batch_size=BATCH, seed=1, rank=0, world_size=2)]
    r1 = [b["input_ids"] for b in SFTLoader(ds, cfg, batch_size=BATCH, seed=1, rank=1, world_size=2)]
    assert len(r0) == len(r1) == len(one) // 2
    for j in range(len(r0)):
        assert (r0[j] == one[2 * j]).all() and (r1[j] == one[2 * j + 1]).all()


def test_workers_give_the_same_batches(exact_index, tok):
    ds = SFTDataset(exact_index, tok, image_spec=SPEC)
    a = [b["input_ids"] for b in SFTLoader(ds, _cfg(), batch_size=BATCH, seed=2, rank=0, world_size=1)]
    b = [b["input_ids"] for b in SFTLoader(ds, _cfg(num_workers=2), batch_size=BATCH, seed=2, rank=0, world_size=1)]
    assert len(a) == len(b) and all((x == y).all() for x, y in zip(a, b))


def test_length_grouped_batches(exact_index, tok):
    ds = SFTDataset(exact_index, tok, image_spec=SPEC)
    cfg = _cfg(batching="length_group", group_factor=4, drop_last=False)
    seen = []
    pads = []
    for batch in SFTLoader(ds, cfg, batch_size=BATCH, seed=0, rank=0, world_size=1):
        assert int(batch["seq_ids"].max()) == 0  # one conversation per row
        seen += _unpack(tok, batch)
        pads.append(float((batch["seq_ids"] == -1).float().mean()))
    assert sorted(seen) == sorted(tuple(ds[i]["input_ids"]) for i in range(len(ds)))
    assert np.mean(pads) < 0.2


def test_bad_samples_at_load_time_are_skipped_or_raise(world, tmp_path, tok, tiny_tokenizer_dir):
    d, recs = world
    import shutil

    root = tmp_path / "root"
    shutil.copytree(d / "img", root / "img")
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs[:24]))
    build_index([src], tmp_path / "i", visual_tokens=VT, image_root=root, tokenizer=tiny_tokenizer_dir, progress=False)
    (root / "img" / "3.png").unlink()  # gone after indexing
    (root / "img" / "4.png").write_bytes(b"not a png")
    ds = SFTDataset(tmp_path / "i", tok, image_spec=SPEC)
    loader = SFTLoader(ds, _cfg(drop_last=False), batch_size=BATCH, seed=0, rank=0, world_size=1)
    n = sum(int(b["seq_ids"].max(dim=1).values.add(1).sum()) for b in loader)
    assert loader.skipped.get("missing_image", 0) > 0 and loader.skipped.get("bad_image", 0) > 0
    assert n + loader.skipped["missing_image"] + loader.skipped["bad_image"] == 24
    strict = SFTLoader(ds, _cfg(strict=True), batch_size=BATCH, seed=0, rank=0, world_size=1)
    with pytest.raises(SFTDataError, match=r"s\.jsonl:\d+: image"):
        list(strict)


def test_too_long_records_are_left_out(exact_index, tok):
    ds = SFTDataset(exact_index, tok, image_spec=SPEC)
    lengths = ds.lengths()
    cfg = _cfg(max_len=int(np.median(lengths)), drop_last=False)
    loader = SFTLoader(ds, cfg, batch_size=BATCH, seed=0, rank=0, world_size=1)
    n = sum(len(_unpack(tok, b)) for b in loader)
    assert loader.skipped["too_long"] == int((lengths > cfg.max_len).sum()) > 0
    assert n == len(ds) - loader.skipped["too_long"]


def test_cli_sft_index(world, tmp_path, tiny_tokenizer_dir, capsys):
    from vlmforge.cli import main

    d, recs = world
    out = tmp_path / "idx"
    rc = main(
        ["sft-index", "--input", str(d / "data.json"), "--out", str(out), "--image-root", str(d),
         "--tokenizer", tiny_tokenizer_dir, "--visual-tokens", str(VT)]
    )
    assert rc == 0
    assert "120 records" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert man["lengths"]["mode"] == "exact" and (out / "config.yaml").is_file()
    assert open_index(out).record(7) == recs[7]
    assert main(["sft-index", "--input", str(tmp_path / "nope.jsonl"), "--out", str(out), "--lengths", "estimate", "--visual-tokens", "4"]) == 2
    assert main(["sft-index", "--input", str(d / "data.json"), "--out", str(out), "--visual-tokens", "4"]) == 2  # exact needs a tokenizer
    # Visual tokens from the recipe's model (tiny-siglip, 64 px, patch 8 -> 8x8 grid).
    assert main(["sft-index", "--input", str(d / "data.jsonl"), "--out", str(tmp_path / "r"), "--lengths", "estimate"]) == 0
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["visual_tokens"] >= 1


def test_build_sft_loader_from_recipe(world, tmp_path, tok, tiny_tokenizer_dir):
    from omegaconf import OmegaConf

    from vlmforge.arch.geometry import visual_tokens_per_image
    from vlmforge.config import load_recipe
    from vlmforge.data.sft.loader import build_sft_loader

    d, recs = world
    recipe = load_recipe(None)
    vt = visual_tokens_per_image(recipe.model)
    build_index([d / "data.jsonl"], tmp_path / "i", visual_tokens=vt, image_root=d, tokenizer=tiny_tokenizer_dir, progress=False)
    sft = OmegaConf.structured(SFTDataConfig(index=str(tmp_path / "i"), max_len=1024))
    loader = build_sft_loader(recipe, tok, batch_size=2, sft_cfg=sft, rank=0, world_size=1)
    batch = next(iter(loader))
    n_img = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    assert int((batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == n_img * vt
    assert loader.state_dict()["batch"] == 1


def test_format_detected_by_content(world, tmp_path):
    """One-record-per-line data in a file named .json (common in the wild) is read as jsonl."""
    d, recs = world
    src = tmp_path / "lines.json"
    src.write_text((d / "data.jsonl").read_text())
    build_index([src], tmp_path / "i", visual_tokens=VT, lengths="estimate", progress=False)
    assert open_index(tmp_path / "i").record(9) == recs[9]


def test_estimated_lengths_never_overflow_a_row(world, tmp_path, tok):
    """With an (under)estimating index, a conversation that does not fit goes to an extra row."""
    d, recs = world
    build_index([d / "data.jsonl"], tmp_path / "e", visual_tokens=VT, image_root=d, lengths="estimate",
                progress=False)  # no tokenizer: 4 bytes/token, more than this tiny tokenizer gets
    ds = SFTDataset(tmp_path / "e", tok, image_spec=SPEC, max_len=128)
    assert (ds.lengths()[:40] < np.array([ds[i]["input_ids"].size for i in range(40)])).any()
    loader = SFTLoader(ds, _cfg(drop_last=False), batch_size=BATCH, seed=0, rank=0, world_size=1)
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape[1] <= 128
        seen += _unpack(tok, batch)
    assert loader.skipped.get("overflow_rows", 0) > 0
    fits = []
    for i in range(len(ds)):
        try:
            fits.append(tuple(ds[i]["input_ids"]))
        except SFTDataError:  # too long for max_len once tokenized
            pass
    assert sorted(seen) == sorted(fits)


def test_epoch_protocol_matches_the_trainer(exact_index, tok):
    """iter() yields the rest of the current epoch; resume = set_epoch + load_state_dict + iter()."""
    ds = SFTDataset(exact_index, tok, image_spec=SPEC)
    loader = SFTLoader(ds, _cfg(), batch_size=BATCH, seed=4, rank=0, world_size=1)
    n = loader.batches_per_epoch(0)
    epoch0 = [b["input_ids"] for b in loader]
    assert len(epoch0) == n and loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch"] == 0
    epoch1 = [b["input_ids"] for b in loader]
    assert len(epoch1) == loader.batches_per_epoch(1)
    again = SFTLoader(ds, _cfg(), batch_size=BATCH, seed=4, rank=0, world_size=1)
    it = iter(again)
    next(it), next(it)
    state = again.state_dict()
    resumed = SFTLoader(ds, _cfg(), batch_size=BATCH, seed=4, rank=0, world_size=1)
    resumed.set_epoch(state["epoch"])
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == n - 2 and all((a == b).all() for a, b in zip(rest, epoch0[2:]))
    with pytest.raises(SFTDataError, match="seed"):
        SFTLoader(ds, _cfg(), batch_size=BATCH, seed=5, rank=0, world_size=1).load_state_dict(state)


def test_a_plain_index_lists_its_files_as_sources(world, tmp_path, tiny_tokenizer_dir):
    """Per file: rows read, kept and dropped reconcile with the index's counts; shares add up."""
    d, recs = world
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(recs[0]) + "\n{not json\n" + json.dumps({**recs[0], "image": "img/none.png"}) + "\n")
    m = build_index([d / "data.jsonl", bad], tmp_path / "i", visual_tokens=VT, image_root=d, lengths="estimate",
                    progress=False)
    a, b = m["sources"]
    assert (a["rows"], a["rows_read"], a["rows_kept"], a["samples"], a["dropped"]) == (120, 120, 120, 120, {})
    assert (b["rows"], b["rows_kept"], b["dropped"]) == (3, 1, {"json_error": 1, "missing_image": 1})
    assert a["name"] is None and a["meta_file"] is None and a["data_augment"] is None and a["repeat_time"] == 1.0
    assert a["image_root"] == str(d) and m["meta_files"] == []
    assert a["share_samples"] == pytest.approx(120 / 121) and a["share_tokens"] + b["share_tokens"] == pytest.approx(1)
    assert m["counts"]["records"] == a["samples"] + b["samples"]


def test_an_index_from_before_sources_reads_as_before(exact_index, tok, tmp_path):
    """An index whose manifest has no ``sources`` (built before meta files): one image root for all
    files, and sft.jpeg_augment on every record."""
    import shutil

    import torch

    old = tmp_path / "old"
    shutil.copytree(exact_index, old)
    man = json.loads((old / "manifest.json").read_text())
    del man["sources"], man["meta_files"]
    (old / "manifest.json").write_text(json.dumps(man))
    new_ds, old_ds = SFTDataset(exact_index, tok, image_spec=SPEC), SFTDataset(old, tok, image_spec=SPEC)
    assert old_ds.source(0) is None and new_ds.source(0)["rows"] == 120
    a = list(SFTLoader(new_ds, _cfg(), batch_size=BATCH, seed=1, rank=0, world_size=1))
    b = list(SFTLoader(old_ds, _cfg(), batch_size=BATCH, seed=1, rank=0, world_size=1))
    assert len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))
    aug = SFTDataset(old, tok, image_spec=SPEC, jpeg_augment=True)
    assert all(aug.augments(i) for i in range(len(aug)))
