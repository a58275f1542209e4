"""SFT data mixtures from InternVL meta files: repeat_time below 1, 1 and above 1 (hand-worked
counts), per-source image roots and JPEG augmentation, the mixture's shares in the manifest, and
bad meta files refused in one line naming the file and the entry."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vlmforge.config.sft import SFTDataConfig
from vlmforge.data.preference.formats import expand_inputs
from vlmforge.data.sft.augment import jpeg_quality, jpeg_reencode
from vlmforge.data.sft.build import build_index
from vlmforge.data.sft.index import open_index
from vlmforge.data.sft.loader import SFTLoader
from vlmforge.data.sft.records import SFTDataError
from vlmforge.data.sft.samples import SFTDataset
from vlmforge.errors import UserError
from vlmforge.text.tokenization import load_tokenizer

VT = 4
SPEC = dict(size=8, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], rescale=1 / 255)
COLOUR = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200)}


def _row(i: int, image: str | None, answer: str = "yes") -> dict:
    q = "<image>\nIs it there?" if image else "Is it there?"
    row = {"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": answer * (1 + i % 3)}]}
    if image:
        row["image"] = image
    return row


def _images(folder, colour, noise=False):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(sum(colour))
    for k in range(3):
        px = np.full((16, 16, 3), colour, np.uint8)
        if noise:
            px = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(px).save(folder / f"{k}.png")


@pytest.fixture()
def mixture(tmp_path):
    """Three sources with hand-countable rows, each with its own image root holding 0.png..2.png.

    a (jsonl, repeat 0.5, augmented, max_dynamic_patch 6): 10 rows; the first 5 are read and row 2
      of those is bad JSON -> 4 kept -> 4 samples.
    b (LLaVA json array, repeat 1): 6 rows; one leads out of its root, one misses its image -> 4 kept.
    c (jsonl, repeat 2.5, text-only rows and images): 8 rows, all good -> 2 x 8 + int(8 x 0.5) = 20.
    """
    for name in "abc":
        _images(tmp_path / f"imgs_{name}", COLOUR[name], noise=name == "a")
    (tmp_path / "ann").mkdir()
    a = [json.dumps(_row(i, f"{i % 3}.png", "a")) for i in range(10)]
    a[2] = "{not json"
    (tmp_path / "ann" / "a.jsonl").write_text("\n".join(a) + "\n")
    b = [_row(i, f"{i % 3}.png", "b") for i in range(6)]
    b[1]["image"] = "../imgs_a/0.png"
    b[4]["image"] = "9.png"
    (tmp_path / "ann" / "b.json").write_text(json.dumps(b, indent=1))
    c = [_row(i, f"{i % 3}.png" if i % 2 else None, "c") for i in range(8)]
    (tmp_path / "ann" / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in c))
    meta = {
        "src_a": {"root": "imgs_a", "annotation": "ann/a.jsonl", "repeat_time": 0.5, "data_augment": True,
                  "max_dynamic_patch": 6, "length": 10},
        "src_b": {"root": str(tmp_path / "imgs_b"), "annotation": str(tmp_path / "ann" / "b.json"), "repeat_time": 1,
                  "data_augment": False},
        "src_c": {"root": "imgs_c", "annotation": "ann/c.jsonl", "repeat_time": 2.5},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta, indent=2))
    return tmp_path, {"a": a, "b": b, "c": c}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _build(tmp_path, tok_dir, inputs, out="idx", **kw):
    return build_index(inputs, tmp_path / out, visual_tokens=VT, tokenizer=tok_dir, progress=False, **kw)


def test_repeat_times_half_one_and_two_and_a_half(mixture, tiny_tokenizer_dir):
    root, rows = mixture
    m = _build(root, tiny_tokenizer_dir, [root / "meta.json"])
    a, b, c = m["sources"]
    assert [s["name"] for s in m["sources"]] == ["src_a", "src_b", "src_c"]
    assert (a["rows"], a["rows_read"], a["rows_kept"], a["dropped"], a["samples"]) == (10, 5, 4, {"json_error": 1}, 4)
    assert (b["rows"], b["rows_read"], b["rows_kept"], b["samples"]) == (6, 6, 4, 4)
    assert b["dropped"] == {"missing_image": 1, "path_outside_root": 1}
    assert (c["rows"], c["rows_read"], c["rows_kept"], c["dropped"], c["samples"]) == (8, 8, 8, {}, 20)
    assert [s["repeat_time"] for s in m["sources"]] == [0.5, 1.0, 2.5]
    assert m["counts"]["records"] == 28 and m["counts"]["scanned"] == 19
    assert m["dropped"] == {"json_error": 1, "missing_image": 1, "path_outside_root": 1}
    ix = open_index(root / "idx")
    got = [ix.record(i) for i in range(len(ix))]
    want = ([json.loads(a_) for k, a_ in enumerate(rows["a"][:5]) if k != 2]
            + [r for k, r in enumerate(rows["b"]) if k not in (1, 4)]
            + rows["c"] * 2 + rows["c"][:4])
    assert got == want
    assert list(np.asarray(ix.file_id)) == [0] * 4 + [1] * 4 + [2] * 20


def test_the_mixtures_shares_are_in_the_manifest(mixture, tiny_tokenizer_dir):
    root, _ = mixture
    m = _build(root, tiny_tokenizer_dir, [root / "meta.json"])
    ix = open_index(root / "idx")
    mm, fid = np.asarray(ix.mm_length).astype(np.int64), np.asarray(ix.file_id)
    total = int(mm.sum())
    c_once = mm[fid == 2][:8]
    assert m["sources"][2]["tokens"] == 2 * int(c_once.sum()) + int(c_once[:4].sum())
    for k, s in enumerate(m["sources"]):
        assert s["tokens"] == int(mm[fid == k].sum())
        assert s["share_samples"] == pytest.approx(s["samples"] / 28)
        assert s["share_tokens"] == pytest.approx(s["tokens"] / total)
    assert sum(s["share_samples"] for s in m["sources"]) == pytest.approx(1.0)
    assert [s["share_samples"] for s in m["sources"]] == pytest.approx([4 / 28, 4 / 28, 20 / 28])
    assert [s["max_dynamic_patch"] for s in m["sources"]] == [6, None, None]
    assert [s["data_augment"] for s in m["sources"]] == [True, False, False]
    assert m["meta_files"][0]["path"] == str((root / "meta.json").resolve())


def test_building_twice_gives_the_same_index(mixture, tiny_tokenizer_dir):
    root, _ = mixture
    m1 = _build(root, tiny_tokenizer_dir, [root / "meta.json"], "one")
    m2 = _build(root, tiny_tokenizer_dir, [root / "meta.json"], "two", workers=2, records_per_job=3)
    assert m1["sources"] == m2["sources"] and m1["counts"] == m2["counts"]
    for name in m1["arrays"]:
        assert np.array_equal(np.load(root / "one" / f"{name}.npy"), np.load(root / "two" / f"{name}.npy"))


def test_each_source_reads_its_images_from_its_own_root(mixture, tiny_tokenizer_dir, tok):
    root, _ = mixture
    _build(root, tiny_tokenizer_dir, [root / "meta.json"])
    ds = SFTDataset(root / "idx", tok, image_spec=SPEC, image_root=root / "elsewhere")  # for plain files only
    for i in range(len(ds)):
        images = ds.decoded(i)[2]
        src = ds.source(i)
        for im in images:
            px = np.asarray(im)
            if src["name"] != "src_a":  # a's images are noise
                assert tuple(px[0, 0]) == COLOUR[src["name"][-1]]
        assert ds.source(i)["image_root"] == str((root / f"imgs_{src['name'][-1]}").resolve())
    # a path that leads out of its root after indexing (a symlink swapped in) is refused at load time
    target = root / "imgs_b" / "0.png"
    target.unlink()
    os.symlink(root / "imgs_a" / "0.png", target)
    i = next(i for i in range(len(ds)) if ds.source(i)["name"] == "src_b" and ds.index.record(i)["image"] == "0.png")
    with pytest.raises(SFTDataError, match="b.json") as e:
        ds.decoded(i)
    assert e.value.reason == "path_outside_root"


def test_jpeg_augmentation_only_on_the_sources_that_ask(mixture, tiny_tokenizer_dir, tok):
    root, _ = mixture
    _build(root, tiny_tokenizer_dir, [root / "meta.json"])
    for plain_switch in (False, True):  # sft.jpeg_augment is for plain record files, not meta sources
        ds = SFTDataset(root / "idx", tok, image_spec=SPEC, jpeg_augment=plain_switch)
        for i in range(len(ds)):
            name = ds.source(i)["name"]
            assert ds.augments(i) == (name == "src_a")
            plain, aug = ds.decoded(i)[2], ds.decoded(i, augment=(3, 0))[2]
            for k, (p, q) in enumerate(zip(plain, aug)):
                if name == "src_a":
                    assert np.array_equal(np.asarray(q), np.asarray(jpeg_reencode(p, jpeg_quality(3, 0, i, k))))
                    assert not np.array_equal(np.asarray(q), np.asarray(p))
                else:
                    assert np.array_equal(np.asarray(q), np.asarray(p))
    # through the loader: a batch of only b and c records equals the un-augmented batch
    ds = SFTDataset(root / "idx", tok, image_spec=SPEC)
    loader = SFTLoader(ds, SFTDataConfig(max_len=256, pack_window=50, drop_last=False), batch_size=2, seed=0,
                       rank=0, world_size=1)
    n_aug = n_same = 0
    records, row_starts, batch_starts = plan = loader.plan(0)
    for j in range(len(batch_starts) - 1):
        batch = loader.build_batch(plan, j)["batch"]
        recs = [int(i) for i in records[row_starts[batch_starts[j]]:row_starts[batch_starts[j + 1]]]]
        with_images = [i for i in recs if ds.index.n_images[i]]
        if not with_images:
            continue
        want = torch.cat([ds[i]["pixel_values"] for i in with_images])
        if any(ds.augments(i) for i in with_images):
            n_aug += 1
            assert not torch.equal(batch["pixel_values"], want)
        else:
            n_same += 1
            assert torch.equal(batch["pixel_values"], want)
    assert n_aug and n_same


def test_plain_files_and_a_meta_file_together(mixture, tiny_tokenizer_dir, tok):
    """A record file next to a meta file reads its images from --image-root and follows sft.jpeg_augment."""
    root, rows = mixture
    plain = root / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows["b"]))
    m = _build(root, tiny_tokenizer_dir, [plain, root / "meta.json"], image_root=root / "imgs_c")
    assert [s["name"] for s in m["sources"]] == [None, "src_a", "src_b", "src_c"]
    p = m["sources"][0]
    assert p["image_root"] == str(root / "imgs_c") and p["data_augment"] is None and p["meta_file"] is None
    assert (p["rows_kept"], p["dropped"]) == (4, {"missing_image": 1, "path_outside_root": 1})
    ds = SFTDataset(root / "idx", tok, image_spec=SPEC, jpeg_augment=True)
    assert ds.augments(0) and tuple(np.asarray(ds.decoded(0)[2][0])[0, 0]) == COLOUR["c"]
    assert not SFTDataset(root / "idx", tok, image_spec=SPEC).augments(0)


def test_an_edited_meta_file_makes_the_index_stale(mixture, tiny_tokenizer_dir):
    root, _ = mixture
    _build(root, tiny_tokenizer_dir, [root / "meta.json"])
    open_index(root / "idx")
    meta = json.loads((root / "meta.json").read_text())
    meta["src_c"]["repeat_time"] = 3
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(SFTDataError, match="stale.*meta.json"):
        open_index(root / "idx")


def test_cli_sft_index_of_a_meta_file(mixture, tiny_tokenizer_dir, capsys):
    from vlmforge.cli import main

    root, _ = mixture
    assert main(["sft-index", "--input", str(root / "meta.json"), "--out", str(root / "cli"), "--tokenizer",
                 tiny_tokenizer_dir, "--visual-tokens", str(VT)]) == 0
    out = capsys.readouterr().out
    assert "28 records" in out
    assert "src_a: 4 of 5 read (10 in the file) x repeat_time 0.5 -> 4 samples (14.3%)" in out
    assert "src_c: 8 of 8 read (8 in the file) x repeat_time 2.5 -> 20 samples (71.4%)" in out
    assert out.count("JPEG augmented") == 1


def _meta(tmp_path, entries, text=None):
    path = tmp_path / "bad_meta.json"
    path.write_text(text if text is not None else json.dumps(entries, indent=2))
    return path


@pytest.mark.parametrize("entry, message", [
    ({"root": "imgs_a"}, r"bad_meta.json: entry 'x': 'annotation' must be"),
    ({"annotation": "ann/nope.jsonl"}, r"bad_meta.json: entry 'x': annotation ann/nope.jsonl is not a file"),
    ({"annotation": "ann/a.jsonl", "root": "no_such"}, r"bad_meta.json: entry 'x': root no_such is not a folder"),
    ({"annotation": "ann/a.jsonl", "repeat_time": -1}, r"bad_meta.json: entry 'x': repeat_time must be a number > 0"),
    ({"annotation": "ann/a.jsonl", "repeat_time": "2"}, r"bad_meta.json: entry 'x': repeat_time"),
    ({"annotation": "ann/a.jsonl", "data_augment": "yes"}, r"bad_meta.json: entry 'x': data_augment must be true or false"),
    ({"annotation": "ann/a.jsonl", "max_dynamic_patch": 0}, r"bad_meta.json: entry 'x': max_dynamic_patch must be an integer"),
    ({"annotation": "ann/a.jsonl", "max_dynamic_patch": 2.5}, r"bad_meta.json: entry 'x': max_dynamic_patch"),
    ("not an object", r"bad_meta.json: entry 'x': must be an object"),
])
def test_bad_meta_entries_are_one_line_errors_naming_file_and_key(mixture, tiny_tokenizer_dir, entry, message, capsys):
    from vlmforge.cli import main

    root, _ = mixture
    good = {"ok": {"root": "imgs_a", "annotation": "ann/a.jsonl"}}
    path = _meta(root, {**good, "x": entry})
    with pytest.raises(UserError, match=message):
        _build(root, tiny_tokenizer_dir, [path])
    with pytest.raises(UserError, match=message):  # the preference index reads meta files the same way
        expand_inputs([path])
    assert main(["sft-index", "--input", str(path), "--out", str(root / "o"), "--lengths", "estimate",
                 "--visual-tokens", "4", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad_meta.json: entry 'x'" in err and "Traceback" not in err


def test_a_meta_file_that_is_not_json_is_named(mixture, tiny_tokenizer_dir):
    root, _ = mixture
    path = _meta(root, None, text='{\n  "x": {"annotation": "ann/a.jsonl",}\n}\n')
    with pytest.raises(UserError, match=r"bad_meta.json: meta file is not valid JSON \(line 2, column"):
        _build(root, tiny_tokenizer_dir, [path])
    path = _meta(root, None, text="{\n}\n")
    with pytest.raises(UserError, match=r"bad_meta.json: meta file lists no sources"):
        _build(root, tiny_tokenizer_dir, [path])
    # a one-record-per-line file is still records, not a meta file
    one = root / "one.jsonl"
    one.write_text(json.dumps(_row(0, None)) + "\n")
    assert _build(root, tiny_tokenizer_dir, [one])["counts"]["records"] == 1


def test_preference_meta_reader_is_the_shared_one(mixture):
    """`vlmforge preference index` reads the same meta file to the same files, roots and repeat times."""
    root, _ = mixture
    files = expand_inputs([root / "meta.json"])
    assert [(f.name, f.path, f.image_root, f.repeat_time) for f in files] == [
        ("src_a", str((root / "ann" / "a.jsonl").resolve()), str((root / "imgs_a").resolve()), 0.5),
        ("src_b", str((root / "ann" / "b.json").resolve()), str((root / "imgs_b").resolve()), 1.0),
        ("src_c", str((root / "ann" / "c.jsonl").resolve()), str((root / "imgs_c").resolve()), 2.5),
    ]
    assert set(files[0].describe()) == {"path", "image_root", "repeat_time", "name", "meta_file"}
