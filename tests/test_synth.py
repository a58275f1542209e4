"""The synthetic world: determinism, img2dataset-exact shards, fault ground truth, derived datasets."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vlmforge.cli import main
from vlmforge.config import load_recipe
from vlmforge.imagedecode import ImageDecodeError, decode_image
from vlmforge.shards import iter_raw_samples, list_shards, read_shard_stats, read_shard_table
from vlmforge.synth.faults import FAULT_TYPES
from vlmforge.synth.world import COLORS, SHAPE_PLURALS, SHAPES
from vlmforge.synth.writer import generate_world

SMALL = [
    "synth.num_captions=150",
    "synth.samples_per_shard=40",
    "synth.num_sft=40",
    "synth.num_mcq=24",
    "synth.num_vqa=20",
    "synth.num_pope_images=12",
    "synth.num_preference=20",
    "synth.num_text=60",
    # enough of every fault to check each kind
    "synth.faults.mismatch_frac=0.06",
    "synth.faults.exact_duplicate_frac=0.03",
    "synth.faults.near_duplicate_frac=0.03",
    "synth.faults.truncated_jpeg_frac=0.02",
    "synth.faults.non_image_frac=0.02",
    "synth.faults.empty_caption_frac=0.02",
    "synth.faults.grayscale_frac=0.02",
    "synth.faults.cmyk_frac=0.02",
    "synth.faults.rgba_frac=0.02",
]


def _small(*extra):
    return load_recipe(None, SMALL + list(extra))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    out = {}
    for name, extra in {"a": [], "b": [], "seed1": ["synth.seed=1"], "more_sft": ["synth.num_sft=45"]}.items():
        generate_world(_small(*extra), root / name)
        out[name] = root / name
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def _samples(world: Path) -> dict[str, object]:
    return {s.key: s for t in list_shards(world / "captions") for s in iter_raw_samples(t)}


def test_same_seed_byte_identical_other_seed_differs(worlds):
    a, b, c = _files(worlds["a"]), _files(worlds["b"]), _files(worlds["seed1"])
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k]]
    assert differing in ([], ["manifest.json"])  # only its creation timestamp (same second: equal)
    assert json.loads(a["manifest.json"])["counts"] == json.loads(b["manifest.json"])["counts"]
    for k in ("captions/00000.tar", "captions/00000.parquet", "sft/llava.json", "eval/mcq.jsonl", "text/corpus.txt"):
        assert a[k] != c[k], k
    # Outputs are independent streams: more SFT data leaves the caption shards untouched.
    d = _files(worlds["more_sft"])
    assert all(d[k] == a[k] for k in a if k.startswith(("captions/", "eval/", "preference/", "text/")))
    assert d["sft/llava.json"] != a["sft/llava.json"]


def test_layout_and_manifest(worlds):
    w = worlds["a"]
    tars = list_shards(w / "captions")
    assert [Path(t).name for t in tars] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    for t in tars:
        stem = t[:-4]
        assert Path(stem + ".parquet").is_file() and Path(stem + "_stats.json").is_file()
    for rel in ("sft/llava.json", "eval/mcq.jsonl", "eval/vqa.jsonl", "eval/pope.jsonl", "preference/pairs.jsonl",
                "text/corpus.txt", "captions/faults.jsonl", "captions/scenes.jsonl", "config.yaml"):  # fmt: skip
        assert (w / rel).is_file(), rel
    m = json.loads((w / "manifest.json").read_text())
    assert m["stage"] == "synth" and m["seed"] == 0 and m["counts"]["captions"]["captions"] == 150
    assert m["config"]["synth"]["num_captions"] == 150
    assert not list(w.glob(".synth-tmp*"))


def test_json_fields_consistent_with_members(worlds):
    w = worlds["a"]
    fields = ["uid", "caption", "url", "key", "status", "error_message", "width", "height",
              "original_width", "original_height", "sha256"]  # fmt: skip
    faults = {r["key"]: r for r in _jsonl(w / "captions/faults.jsonl")}
    uids = set()
    n = 0
    for t in list_shards(w / "captions"):
        table = {r["key"]: r for r in read_shard_table(t).to_pylist()}
        stats = read_shard_stats(t)
        keys = []
        for s in iter_raw_samples(t):
            n += 1
            keys.append(s.key)
            assert s.error is None
            assert set(fields) <= set(s.meta), s.key
            assert re.fullmatch(r"\d{9}", s.key) and s.meta["key"] == s.key
            assert re.fullmatch(r"[0-9a-f]{32}", s.meta["uid"]) and s.meta["uid"] not in uids
            uids.add(s.meta["uid"])
            assert s.meta["uid"] in s.meta["url"]
            assert s.meta["caption"] == s.caption
            assert s.meta["sha256"] == hashlib.sha256(s.image_bytes).hexdigest()
            assert s.meta["status"] == "success" and s.meta["error_message"] is None
            kind = faults.get(s.key, {}).get("fault")
            if kind == "non_image":
                assert s.meta["width"] is None
            elif kind == "truncated_jpeg":  # json describes the image as served; header may be cut
                assert (s.meta["width"], s.meta["height"]) == (64, 64)
            else:
                with Image.open(io.BytesIO(s.image_bytes)) as im:
                    assert (s.meta["width"], s.meta["height"]) == im.size == (64, 64)
                assert (s.meta["original_width"], s.meta["original_height"]) == (64, 64)
            assert table[s.key] == s.meta  # parquet mirrors the json
        assert list(table) == keys
        assert stats["count"] == stats["successes"] == len(keys) and stats["status_dict"] == {"success": len(keys)}
    assert n == 150


def _caption_consistent(caption: str, scene: dict) -> bool:
    """Every colour and shape word in the caption is in the scene."""
    colors = {o["color"] for o in scene["objects"]}
    shapes = {o["shape"] for o in scene["objects"]}
    words = re.findall(r"[a-z]+", caption.lower())
    plural_to_shape = {v: k for k, v in SHAPE_PLURALS.items()}
    said_colors = {w for w in words if w in COLORS}
    said_shapes = {plural_to_shape.get(w, w) for w in words if w in SHAPES or w in plural_to_shape}
    return said_colors <= colors and said_shapes <= shapes and said_colors and said_shapes


def test_fault_side_file_matches_shards(worlds):
    w = worlds["a"]
    samples = _samples(w)
    faults = _jsonl(w / "captions/faults.jsonl")
    scenes = {r["key"]: r["scene"] for r in _jsonl(w / "captions/scenes.jsonl")}
    by_key = {r["key"]: r for r in faults}
    assert len(by_key) == len(faults)  # one fault per sample at most
    expected = {"mismatch": 9, "exact_duplicate": 4, "near_duplicate": 4}
    counts = {t: sum(r["fault"] == t for r in faults) for t in FAULT_TYPES}
    assert counts == {t: expected.get(t, 3) for t in FAULT_TYPES}
    for r in faults:
        s = samples[r["key"]]
        assert r["shard"] == Path(s.shard).name
        kind = r["fault"]
        if kind in ("truncated_jpeg", "non_image"):
            with pytest.raises(ImageDecodeError):
                decode_image(s.image_bytes)
            if kind == "truncated_jpeg":
                assert len(s.image_bytes) == r["kept_bytes"] < r["original_bytes"] and s.image_bytes[:2] == b"\xff\xd8"
            continue
        im = decode_image(s.image_bytes)
        raw_mode = Image.open(io.BytesIO(s.image_bytes)).mode
        if kind == "grayscale":
            assert raw_mode == "L"
        elif kind == "cmyk":
            assert raw_mode == "CMYK"
        elif kind == "rgba":
            assert raw_mode == "RGBA" and s.image_bytes[:4] == b"\x89PNG"
        else:
            assert raw_mode == "RGB"
        if kind == "empty_caption":
            assert s.caption == "" and _caption_consistent(r["true_caption"], scenes[s.key])
        elif kind == "mismatch":
            src = samples[r["caption_from_key"]]
            assert r["caption_from_key"] not in by_key  # points at a clean sample
            assert s.caption == src.caption != r["true_caption"]
            assert scenes[s.key] != scenes[src.key]
            assert _caption_consistent(r["true_caption"], scenes[s.key])
        elif kind in ("exact_duplicate", "near_duplicate"):
            src = samples[r["duplicate_of_key"]]
            assert r["duplicate_of_key"] not in by_key and src.key != s.key
            assert scenes[s.key] == scenes[src.key]
            if kind == "exact_duplicate":
                assert s.image_bytes == src.image_bytes and s.caption == src.caption
            else:
                assert s.image_bytes != src.image_bytes
                diff = np.abs(np.asarray(im, float) - np.asarray(decode_image(src.image_bytes), float)).mean()
                assert diff < 10, diff  # same picture, resized and re-encoded
                assert _phash_distance(im, decode_image(src.image_bytes)) <= 4
    # Every other sample is clean: RGB JPEG, caption grounded in its scene.
    clean = [k for k in samples if k not in by_key]
    assert len(clean) == 150 - len(faults)
    for k in clean:
        s = samples[k]
        assert Image.open(io.BytesIO(s.image_bytes)).format == "JPEG"
        assert decode_image(s.image_bytes).size == (64, 64)
        assert _caption_consistent(s.caption, scenes[k]), (s.caption, scenes[k])


def _phash_distance(a, b) -> int:
    import imagehash

    return int(imagehash.phash(a) - imagehash.phash(b))


def test_clean_images_are_not_perceptual_duplicates(worlds):
    """Distinct scenes must not look alike to a perceptual hash, or dedup could not be scored."""
    import imagehash

    w = worlds["a"]
    faults = {r["key"] for r in _jsonl(w / "captions/faults.jsonl")}
    hashes = [imagehash.phash(decode_image(s.image_bytes)) for k, s in _samples(w).items() if k not in faults]
    close = {i for i in range(len(hashes)) for j in range(len(hashes)) if i != j and hashes[i] - hashes[j] <= 4}
    assert len(close) <= 0.05 * len(hashes), len(close)


def test_shards_read_back_with_webdataset(worlds):
    w = worlds["a"]
    tars = list_shards(w / "captions")
    raw = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(raw) == 150 and all({"jpg", "txt", "json"} <= set(s) for s in raw)
    assert [s["__key__"] for s in raw] == list(_samples(w))
    undecodable = sum(r["fault"] in ("truncated_jpeg", "non_image") for r in _jsonl(w / "captions/faults.jsonl"))
    decoded = list(wds.WebDataset(tars, shardshuffle=False).decode("pil", handler=wds.ignore_and_continue))
    assert len(decoded) == 150 - undecodable
    assert all(isinstance(s["jpg"], Image.Image) and isinstance(s["json"], dict) for s in decoded)


def test_llava_sft_format(worlds):
    w = worlds["a"]
    recs = json.loads((w / "sft/llava.json").read_text())
    assert len(recs) == 40 and len({r["id"] for r in recs}) == 40
    turns = []
    for r in recs:
        assert (w / "sft" / r["image"]).is_file()
        conv = r["conversations"]
        assert len(conv) % 2 == 0 and [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(c["value"].count("<image>") for c in conv) == 1
        assert all(c["value"].strip() for c in conv)
        turns.append(len(conv) // 2)
    assert 1 in turns and max(turns) >= 3  # single- and multi-turn
    cats = {c for r in recs for c in r["categories"]}
    assert {"color", "shape", "count", "position", "existence", "describe", "mcq"} <= cats
    answers = [c["value"] for r in recs for c in r["conversations"] if c["from"] == "gpt"]
    assert any(len(a.split()) == 1 for a in answers) and any(len(a.split()) > 8 for a in answers)


def test_eval_sets_on_unseen_images(worlds):
    w = worlds["a"]
    ev = w / "eval"
    scenes = {r["image"]: r["scene"] for r in _jsonl(ev / "scenes.jsonl")}
    mcq, vqa, pope = _jsonl(ev / "mcq.jsonl"), _jsonl(ev / "vqa.jsonl"), _jsonl(ev / "pope.jsonl")
    assert len(mcq) == 24 and len(vqa) == 20 and len(pope) == 12 * 4
    for r in mcq:
        assert set(r["options"]) == set("ABCD") and len(set(r["options"].values())) == 4
        assert r["answer"] in "ABCD" and r["category"] in ("color", "shape", "count", "position")
        assert r["prompt"].startswith(r["question"]) and "D. " in r["prompt"]
        if r["category"] == "count" and r["question"] in ("How many shapes are there?",):
            assert r["options"][r["answer"]] == str(len(scenes[r["image"]]["objects"]))
    for r in vqa:
        assert len(r["answers"]) == 10 and r["answers"].count(r["answer"]) >= 4
    assert sum(r["answer"] == "yes" for r in pope) == len(pope) // 2  # balanced
    for r in pope:
        names = {f"{o['color']} {o['shape']}" for o in scenes[r["image"]]["objects"]}
        assert (r["object"] in names) == (r["answer"] == "yes")
        assert r["sampling"] in ("random", "popular", "adversarial")
    # Held out: no evaluation image appears in captions, SFT or preference data.
    def hashes(paths):
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}

    eval_h = hashes((ev / "images").iterdir())
    assert len(eval_h) == 24 + 20 + 12
    train_h = hashes((w / "sft/images").iterdir()) | hashes((w / "preference/images").iterdir())
    train_h |= {s.meta["sha256"] for s in _samples(w).values()}
    assert not eval_h & train_h


def test_preference_pairs_and_text(worlds):
    w = worlds["a"]
    pairs = _jsonl(w / "preference/pairs.jsonl")
    assert len(pairs) == 20
    for p in pairs:
        assert {"id", "image", "prompt", "chosen", "rejected"} <= set(p)
        assert p["prompt"].startswith("<image>\n") and p["chosen"] != p["rejected"]
        assert (w / "preference" / p["image"]).is_file()
    lines = (w / "text/corpus.txt").read_text().splitlines()
    assert len(lines) == 60 and all(line.strip() for line in lines)


def test_cli(tmp_path, capsys):
    out = tmp_path / "world"
    argv = ["synth", "--out", str(out), "--quiet", "--clean", "--seed", "3"]
    for s in SMALL[:8]:
        argv += ["--set", s]
    assert main(argv) == 0
    assert "150 captions" in capsys.readouterr().out
    assert (out / "captions/faults.jsonl").read_text() == ""  # --clean
    assert "seed: 3" in (out / "config.yaml").read_text()
    assert main(argv) == 2  # refuses to overwrite silently
    assert "not empty" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert main(["synth", "--out", str(tmp_path / "x"), "--set", "synth.shapes=[blob,circle]"]) == 2
    assert main(["synth", "--out", str(tmp_path / "y"), "--set", "synth.faults.mismatch_frac=0.9"]) == 2


def test_sft_turn_mix_is_configurable(tmp_path):
    """synth.sft_turn_weights / sft_short_answer_frac shape the SFT mix; bad values fail before writing."""
    multi = ["synth.num_sft=60", "synth.sft_multi_turn_frac=1.0", "synth.sft_max_turns=4"]
    w = tmp_path / "mcq_only"
    generate_world(_small(*multi, "synth.sft_turn_weights.mcq=1.0"), w)
    recs = json.loads((w / "sft/llava.json").read_text())
    assert {c for r in recs for c in r["categories"]} == {"mcq"}
    assert all(re.fullmatch("[ABCD]", c["value"]) for r in recs for c in r["conversations"] if c["from"] == "gpt")

    def answers(frac):
        d = tmp_path / f"short{frac}"
        generate_world(_small(*multi, "synth.sft_turn_weights.color=1.0", f"synth.sft_short_answer_frac={frac}"), d)
        recs = json.loads((d / "sft/llava.json").read_text())
        return [c["value"] for r in recs for c in r["conversations"] if c["from"] == "gpt"]

    assert all(len(a.split()) == 1 for a in answers(1.0))  # "Red"
    assert all(len(a.split()) > 2 for a in answers(0.0))  # "The circle is red."
    for bad in ("synth.sft_turn_weights.jokes=1.0", "synth.sft_turn_weights.mcq=-1.0", "synth.sft_short_answer_frac=1.5"):
        out = tmp_path / "bad"
        assert main(["synth", "--out", str(out), "--quiet", "--set", bad]) == 2
        assert not out.exists() or not any(out.iterdir())


def test_text_only_sft_conversations_describe_the_scene_in_words(tmp_path):
    """synth.sft_text_only_frac: that share of conversations has no image (no file, no <image>); the
    first turn describes the scene and the answers are the scene's; bad fractions fail."""
    multi = ["synth.num_sft=80", "synth.sft_multi_turn_frac=1.0", "synth.sft_max_turns=4"]
    w = tmp_path / "half"
    manifest = generate_world(_small(*multi, "synth.sft_text_only_frac=0.5"), w)
    recs = json.loads((w / "sft/llava.json").read_text())
    text = [r for r in recs if "image" not in r]
    assert 20 <= len(text) <= 60 and manifest["sft"]["text_only"] == len(text)
    assert len(list((w / "sft/images").iterdir())) == len(recs) - len(text)
    for r in text:
        turns = [c["value"] for c in r["conversations"]]
        assert not any("<image>" in t for t in turns)
        assert re.match(r"The image shows (one shape|\w+ shapes) on a light background\.", turns[0])
    # grounded: every short colour answer names a colour the description states
    colour_turns = [(r["conversations"][0]["value"], r["conversations"][i + 1]["value"]) for r in text
                    for i in range(0, len(r["conversations"]), 2)
                    if r["categories"][i // 2] == "color" and "single word" in r["conversations"][i]["value"]]
    assert colour_turns and all(a.lower() in d for d, a in colour_turns)
    assert main(["synth", "--out", str(tmp_path / "bad"), "--quiet", "--set", "synth.sft_text_only_frac=1.5"]) == 2


def test_caption_mix_is_configurable(tmp_path):
    """synth.caption_mix picks the caption styles; unknown styles and bad weights fail before writing."""
    w = tmp_path / "dense"
    generate_world(_small("synth.caption_mix.dense=1.0"), w)
    captions = [s.caption for shard in list_shards(str(w / "captions")) for s in iter_raw_samples(shard) if s.caption]
    assert captions and all(re.match(r"There (is one shape|are \w+ shapes) in the image\. ", t) for t in captions)
    for bad in ("synth.caption_mix.poems=1.0", "synth.caption_mix.dense=-1.0"):
        out = tmp_path / "bad"
        assert main(["synth", "--out", str(out), "--quiet", "--set", bad]) == 2
        assert not out.exists() or not any(out.iterdir())
