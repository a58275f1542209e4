"""Preference data: the readers (MMPR jsonl, InternVL meta.json, synth pairs), the memory-mapped
index, every bad-row reason, --strict and the `vlmforge preference index` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmforge.data.preference.build import build_preference_index
from vlmforge.data.preference.formats import REASONS, PreferenceDataError, expand_inputs, row_to_pair
from vlmforge.data.preference.index import ARRAYS, open_preference_index
from vlmforge.data.preference.loader import PreferenceSamples
from vlmforge.data.preference.tokens import end_of_turn_id, prompt_ids, prompt_lengths, response_ids, response_lengths
from vlmforge.text.tokenization import load_tokenizer

VT = 4  # visual tokens per image in these indexes


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _index(tmp_path, tok_dir, inputs, name="idx", **kw):
    kw.setdefault("visual_tokens", VT)
    kw.setdefault("max_len", 512)
    return build_preference_index(inputs, tmp_path / name, tokenizer=tok_dir, progress=False, **kw)


# ----------------------------------------------------------------------------- readers


def test_mmpr_rows_get_one_image_marker_per_image_and_keep_metadata():
    one = row_to_pair({"image": "a.png", "question": "What colour is the circle?", "chosen": "Red.",
                       "rejected": "Blue.", "answer_gt": "red"})
    assert one.question == "<image>\nWhat colour is the circle?" and one.images == ["a.png"]
    assert one.meta == {"answer_gt": "red"} and one.format == "mmpr"
    two = row_to_pair({"image": ["a.png", "b.png"], "question": "Same shape?", "chosen": "Yes.", "rejected": "No."})
    assert two.question == "<image>\n<image>\nSame shape?" and two.images == ["a.png", "b.png"]
    placed = row_to_pair({"image": ["a.png", "b.png"], "question": "Left <image> right <image>?",
                          "chosen": "Yes.", "rejected": "No."})
    assert placed.question == "Left <image> right <image>?"  # markers already there: left as written
    text = row_to_pair({"question": "Say yes.", "chosen": "Yes.", "rejected": "No."})
    assert text.question == "Say yes." and text.images == []


def test_synth_pairs_are_read_with_their_extra_fields_as_metadata(tmp_path, tiny_tokenizer_dir):
    from vlmforge.config.synth import SynthConfig
    from vlmforge.synth.preference import preference_row
    from vlmforge.synth.world import SceneSampler

    world = SceneSampler.from_config(SynthConfig())
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        rows.append(preference_row(f"pref-{i}", f"images/pref-{i}.png", world.sample(rng), rng, world))
        _image(tmp_path / "preference" / "images" / f"pref-{i}.png")
    src = _jsonl(tmp_path / "preference" / "pairs.jsonl", rows)
    man = _index(tmp_path, tiny_tokenizer_dir, [src])  # image root: the file's own folder
    assert man["counts"]["pairs"] == 6 and man["counts"]["formats"] == {"synth": 6} and not man["dropped"]
    idx = open_preference_index(tmp_path / "idx")
    pair = idx.pair(3)
    assert pair.question == rows[3]["prompt"] and pair.question.startswith("<image>\n")  # no second marker
    assert pair.meta == {k: rows[3][k] for k in ("id", "category", "error")}
    assert idx.image_root(3) == str((tmp_path / "preference").resolve())


def test_meta_json_roots_and_repeat_time_below_and_above_one(tmp_path, tiny_tokenizer_dir):
    rows_a = [{"image": f"a{i}.png", "question": f"Is there a red star {i}?", "chosen": "Yes.", "rejected": "No."}
              for i in range(5)]
    rows_b = [{"image": f"sub/b{i}.png", "question": "How many shapes are there?", "chosen": f"There are {i} shapes.",
               "rejected": "There are 9 shapes."} for i in range(4)]
    for i in range(5):
        _image(tmp_path / "imgs_a" / f"a{i}.png")
    for i in range(4):
        _image(tmp_path / "imgs_b" / "sub" / f"b{i}.png")
    _jsonl(tmp_path / "ann" / "a.jsonl", rows_a)
    _jsonl(tmp_path / "ann" / "b.jsonl", rows_b)
    meta = {
        "part_a": {"root": "imgs_a", "annotation": "ann/a.jsonl", "repeat_time": 0.4},  # relative to meta.json's folder
        "part_b": {"root": str(tmp_path / "imgs_b"), "annotation": str(tmp_path / "ann" / "b.jsonl"), "repeat_time": 2.5},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    man = _index(tmp_path, tiny_tokenizer_dir, [tmp_path / "meta.json"])
    # a: first int(5 * 0.4) = 2 rows; b: 4 rows twice, then the first int(4 * 0.5) = 2 once more
    assert man["counts"]["pairs"] == 2 + 8 + 2 and man["counts"]["rows_kept"] == 6 and not man["dropped"]
    assert [s["name"] for s in man["sources"]] == ["part_a", "part_b"]
    assert [s["pairs"] for s in man["sources"]] == [2, 10]
    idx = open_preference_index(tmp_path / "idx")
    assert [int(x) for x in idx.line] == [1, 2] + [1, 2, 3, 4] * 2 + [1, 2]
    assert [idx.pair(i).chosen for i in range(2, 6)] == [r["chosen"] for r in rows_b]
    assert idx.image_root(0) == str((tmp_path / "imgs_a").resolve()) and idx.image_root(5) == str((tmp_path / "imgs_b").resolve())
    # a meta.json with a bad entry is refused naming the file and the entry
    (tmp_path / "bad_meta.json").write_text(json.dumps({"x": {"root": "imgs_a", "annotation": "ann/a.jsonl", "repeat_time": 0}}))
    with pytest.raises(Exception, match=r"bad_meta.json: entry 'x': repeat_time"):
        expand_inputs([tmp_path / "bad_meta.json"])


# ----------------------------------------------------------------------------- index


def test_index_lengths_are_the_loader_tokens_and_arrays_are_memory_mapped(tmp_path, tok, tiny_tokenizer_dir):
    rows = []
    for i in range(7):
        imgs = [f"i{i}_{k}.png" for k in range(i % 3)]
        for im in imgs:
            _image(tmp_path / "img" / im)
        rows.append({"image": imgs, "question": "Describe the image." + " Answer with one word." * (i % 2),
                     "chosen": "A small red circle at the left." * (1 + i % 2), "rejected": f"There are {i} shapes."})
    src = _jsonl(tmp_path / "rows.jsonl", rows)
    _index(tmp_path, tiny_tokenizer_dir, [src], image_root=tmp_path / "img")
    idx = open_preference_index(tmp_path / "idx")
    for name, dtype in ARRAYS.items():
        arr = np.load(tmp_path / "idx" / f"{name}.npy", mmap_mode="r")
        assert isinstance(arr, np.memmap) and arr.dtype == dtype and arr.shape == (7,)
    samples = PreferenceSamples(idx, tok, visual_tokens=VT, image_spec=None)
    for i in range(7):
        prompt, chosen, rejected, images = samples.tokens(i)
        assert (prompt.size, chosen.size, rejected.size) == (
            int(idx.prompt_tokens[i]), int(idx.chosen_tokens[i]), int(idx.rejected_tokens[i]))
        assert int(idx.n_images[i]) == len(images) == i % 3
    # another visual-token count is recomputed from the text lengths, not re-read
    samples9 = PreferenceSamples(idx, tok, visual_tokens=9, image_spec=None)
    assert [samples9.tokens(i)[0].size for i in range(7)] == idx.prompt_lengths(9).tolist()
    # the batched counters equal the per-pair encoders
    questions = [idx.pair(i).question for i in range(7)]
    end = end_of_turn_id(tok)
    assert prompt_lengths(tok, questions) == [len(prompt_ids(tok, q)) for q in questions]
    texts = [r["chosen"] for r in rows]
    assert response_lengths(tok, texts) == [len(response_ids(tok, t, end)) for t in texts]
    # the index is refused once its row file changes
    os.utime(src, ns=(1, 1))
    with pytest.raises(PreferenceDataError, match="stale"):
        open_preference_index(tmp_path / "idx")


def _bad_rows(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A file with one good row and one row per bad-row reason; returns it and reason -> line."""
    _image(tmp_path / "img" / "ok.png")
    (tmp_path / "outside.png").write_bytes(b"")
    long_q = "Describe the image. " * 200
    rows = [
        ("good", {"image": "ok.png", "question": "What colour is the circle?", "chosen": "Red.", "rejected": "Blue."}),
        ("unparsable", '{"image": "ok.png", "question": "cut'),
        ("missing_image", {"image": "gone.png", "question": "Q?", "chosen": "Red.", "rejected": "Blue."}),
        ("empty_chosen", {"image": "ok.png", "question": "Q?", "chosen": "  ", "rejected": "Blue."}),
        ("empty_rejected", {"image": "ok.png", "question": "Q?", "chosen": "Red.", "rejected": ""}),
        ("chosen_equals_rejected", {"image": "ok.png", "question": "Q?", "chosen": "Red.", "rejected": "Red. "}),
        ("prompt_too_long", {"image": "ok.png", "question": long_q, "chosen": "Red.", "rejected": "Blue."}),
        ("path_outside_root", {"image": "../outside.png", "question": "Q?", "chosen": "Red.", "rejected": "Blue."}),
        ("image_marker_mismatch", {"image": "ok.png", "question": "<image> and <image>?", "chosen": "Red.",
                                   "rejected": "Blue."}),
    ]
    src = _jsonl(tmp_path / "rows.jsonl", [r for _, r in rows])
    return src, {reason: line for line, (reason, _) in enumerate(rows, 1) if reason != "good"}


def test_every_bad_row_reason_is_skipped_and_counted_with_file_and_line(tmp_path, tiny_tokenizer_dir):
    src, lines = _bad_rows(tmp_path)
    assert set(lines) == set(REASONS)
    man = _index(tmp_path, tiny_tokenizer_dir, [src], image_root=tmp_path / "img", max_len=256)
    assert man["counts"]["pairs"] == 1 and man["counts"]["rows_read"] == 9
    assert man["dropped"] == {reason: 1 for reason in REASONS}
    for reason, line in lines.items():
        (ex,) = man["dropped_examples"][reason]
        assert ex["file"] == str(src.resolve()) and ex["line"] == line, reason
    assert open_preference_index(tmp_path / "idx").pair(0).chosen == "Red."


def test_strict_stops_at_the_first_bad_row_naming_file_and_line(tmp_path, tiny_tokenizer_dir, capsys):
    from vlmforge.cli import main

    src, lines = _bad_rows(tmp_path)
    with pytest.raises(PreferenceDataError, match=rf"rows.jsonl:{lines['unparsable']}: unparsable"):
        _index(tmp_path, tiny_tokenizer_dir, [src], image_root=tmp_path / "img", strict=True)
    capsys.readouterr()
    rc = main(["preference", "index", "--input", str(src), "--out", str(tmp_path / "cli"), "--image-root",
               str(tmp_path / "img"), "--tokenizer", tiny_tokenizer_dir, "--visual-tokens", str(VT), "--strict"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the lines before: the progress bar
    assert rc == 2 and err.startswith("vlmforge preference: error: ") and f"{src.resolve()}:2: unparsable" in err
    # a later-line reason is still found first when it is the first bad one (prompt_too_long needs the tokenizer)
    only = _jsonl(tmp_path / "later.jsonl", [json.loads((src.read_text().splitlines())[0]),
                                             json.loads(src.read_text().splitlines()[6]),
                                             json.loads(src.read_text().splitlines()[2])])
    with pytest.raises(PreferenceDataError, match=r"later.jsonl:2: prompt_too_long"):
        _index(tmp_path, tiny_tokenizer_dir, [only], name="later", image_root=tmp_path / "img", strict=True, max_len=256)


def test_cli_preference_index(tmp_path, tiny_tokenizer_dir, capsys):
    from vlmforge.cli import main

    src, _ = _bad_rows(tmp_path)
    out = tmp_path / "cli"
    args = ["preference", "index", "--input", str(src), "--out", str(out), "--image-root", str(tmp_path / "img"),
            "--tokenizer", tiny_tokenizer_dir, "--visual-tokens", str(VT), "--max-len", "256"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 pairs" in printed and "prompt_too_long 1" in printed
    assert (out / "config.yaml").is_file() and json.loads((out / "manifest.json").read_text())["max_len"] == 256
    assert main(args) == 2  # not empty: needs --overwrite
    assert main(args + ["--overwrite"]) == 0
    assert main(["preference", "index", "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x"),
                 "--tokenizer", tiny_tokenizer_dir]) == 2
    # only bad rows: refused, naming the manifest with the examples
    _jsonl(tmp_path / "allbad.jsonl", ['{"cut'])
    assert main(["preference", "index", "--input", str(tmp_path / "allbad.jsonl"), "--out", str(tmp_path / "y"),
                 "--tokenizer", tiny_tokenizer_dir, "--visual-tokens", "4"]) == 2
    assert "no usable pair" in capsys.readouterr().err
    # visual tokens from the recipe's model and files from preference.sources
    assert main(["preference", "index", "--out", str(tmp_path / "z"), "--tokenizer", tiny_tokenizer_dir,
                 "--set", f"preference.sources=[{src}]", "--set", f"preference.image_root={tmp_path / 'img'}"]) == 0
    from vlmforge.arch.geometry import visual_tokens_per_image
    from vlmforge.config import load_recipe

    assert json.loads((tmp_path / "z" / "manifest.json").read_text())["visual_tokens"] == visual_tokens_per_image(
        load_recipe(None, []).model)
