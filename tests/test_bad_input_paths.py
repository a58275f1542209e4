"""Image paths read from data files stay inside their declared root (issue 22, point 1).

Each case is an SFT record or an eval row naming an image outside the root: ``../elsewhere``, an
absolute path, ``../../../../etc/passwd``, a symlink that points out. Each is refused and counted as
``path_outside_root`` with file:line (strict: the first one stops the run); absolute paths are read
only with the opt-in. Also: ``sft-index --strict`` stops at the first bad record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmforge.data.sft import parallel
from vlmforge.data.sft.build import build_index
from vlmforge.data.sft.records import SFTDataError
from vlmforge.data.sft.samples import SFTDataset
from vlmforge.eval.items import TaskError
from vlmforge.eval.tasks import load_items
from vlmforge.files import PathOutsideRootError, resolve_inside

VT = 4
CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red circle."}]


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)
    return path


@pytest.fixture
def layout(tmp_path):
    """root/ (the declared image root, with ok.png and a symlink out), elsewhere/x.png beside it."""
    root = tmp_path / "root"
    _png(root / "ok.png")
    outside = _png(tmp_path / "elsewhere" / "x.png")
    os.symlink(outside, root / "link.png")  # a symlink inside the root pointing out of it
    os.symlink(tmp_path / "elsewhere", root / "linkdir")  # a folder symlink pointing out
    return {"root": root, "outside": outside}


def _bad_paths(layout) -> dict[str, str]:
    return {
        "dotdot": "../elsewhere/x.png",
        "absolute": str(layout["outside"]),
        "passwd": "../../../../etc/passwd",
        "symlink": "link.png",
        "symlink_dir": "linkdir/x.png",
    }


def _sft_file(tmp_path, images: list[str]) -> Path:
    src = tmp_path / "data.jsonl"
    lines = [json.dumps({"image": "ok.png", "conversations": CONV})]
    lines += [json.dumps({"image": im, "conversations": CONV}) for im in images]
    src.write_text("\n".join(lines) + "\n")
    return src


# -- the shared helper ------------------------------------------------------------------------
def test_resolve_inside_refuses_each_escape_and_accepts_inside(layout):
    root = layout["root"]
    for rel in _bad_paths(layout).values():
        with pytest.raises(PathOutsideRootError):
            resolve_inside(root, rel)
    assert resolve_inside(root, "ok.png") == (root / "ok.png").resolve()
    assert resolve_inside(root, "sub/../ok.png") == (root / "ok.png").resolve()
    assert resolve_inside(root, str(layout["outside"]), allow_absolute=True) == layout["outside"].resolve()
    with pytest.raises(PathOutsideRootError):  # no root yet: lexical check only
        resolve_inside(None, "a/../../x.png")
    assert resolve_inside(None, "a/./b.png") == Path("a/b.png")


# -- SFT index ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["dotdot", "absolute", "passwd", "symlink", "symlink_dir"])
def test_sft_index_counts_path_outside_root_with_file_line(tmp_path, layout, case):
    src = _sft_file(tmp_path, [_bad_paths(layout)[case]])
    m = build_index([src], tmp_path / "idx", visual_tokens=VT, image_root=layout["root"], lengths="estimate",
                    progress=False)
    assert m["counts"]["records"] == 1
    assert m["dropped"] == {"path_outside_root": 1}
    ex = m["dropped_examples"]["path_outside_root"][0]
    assert ex["file"] == str(src) and ex["line"] == 2


@pytest.mark.parametrize("case", ["dotdot", "absolute", "passwd", "symlink"])
def test_sft_index_strict_stops_at_path_outside_root(tmp_path, layout, case):
    src = _sft_file(tmp_path, [_bad_paths(layout)[case]])
    with pytest.raises(SFTDataError, match=rf"{src}:2: path_outside_root"):
        build_index([src], tmp_path / "idx", visual_tokens=VT, image_root=layout["root"], lengths="estimate",
                    strict=True, progress=False)


def test_sft_index_without_image_root_still_refuses_escapes(tmp_path, layout):
    src = _sft_file(tmp_path, ["../elsewhere/x.png", "/etc/passwd", "a/../../b.png"])
    m = build_index([src], tmp_path / "idx", visual_tokens=VT, lengths="estimate", progress=False)
    assert m["counts"]["records"] == 1 and m["dropped"] == {"path_outside_root": 3}


def test_sft_absolute_paths_need_the_opt_in(tmp_path, layout):
    src = _sft_file(tmp_path, [str(layout["outside"])])
    m = build_index([src], tmp_path / "idx", visual_tokens=VT, image_root=layout["root"], lengths="estimate",
                    allow_absolute_paths=True, progress=False)
    assert m["counts"]["records"] == 2 and m["dropped"] == {} and m["allow_absolute_paths"] is True


def test_sft_loader_refuses_a_symlink_out_of_the_root(tmp_path, layout, tiny_tokenizer_dir):
    """An index built without an image root (lexical check only) is checked again when read."""
    from vlmforge.text.tokenization import load_tokenizer

    src = _sft_file(tmp_path, ["link.png"])
    build_index([src], tmp_path / "idx", visual_tokens=VT, lengths="estimate", progress=False)
    spec = {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "rescale": 1 / 255}
    ds = SFTDataset(tmp_path / "idx", load_tokenizer(tiny_tokenizer_dir), image_spec=spec, image_root=layout["root"])
    assert ds[0]["pixel_values"].shape == (1, 3, 8, 8)
    with pytest.raises(SFTDataError, match=rf"{src}:2: .*outside the image root") as e:
        ds[1]
    assert e.value.reason == "path_outside_root"


# -- strict stops at the first bad record ------------------------------------------------------
def test_strict_stops_at_the_first_bad_record_without_reading_the_rest(tmp_path, monkeypatch):
    good = json.dumps({"conversations": [{"from": "human", "value": "hi"}, CONV[1]]})
    first = tmp_path / "a.jsonl"
    first.write_text("\n".join([good, "{not json", *[good] * 200]) + "\n")
    second = tmp_path / "b.json"
    second.write_text('[{"conversations": [')  # unbalanced: scanning it would fail first
    calls = []
    real = parallel.llava_to_messages
    monkeypatch.setattr(parallel, "llava_to_messages", lambda rec: (calls.append(1), real(rec))[1])
    with pytest.raises(SFTDataError, match=rf"{first}:2: json_error"):
        build_index([first, second], tmp_path / "idx", visual_tokens=VT, lengths="estimate", strict=True,
                    progress=False)
    assert len(calls) == 1  # the record before the bad one, none after it


# -- eval rows ----------------------------------------------------------------------------------
def _eval_file(tmp_path, image: str) -> Path:
    path = tmp_path / "vqa.jsonl"
    rows = [{"id": "ok", "question": "What?", "answers": ["a"], "image": "ok.png"},
            {"id": "bad", "question": "What?", "answers": ["a"], "image": image}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", ["dotdot", "absolute", "passwd", "symlink", "symlink_dir"])
def test_eval_row_outside_root_is_refused_with_file_line(tmp_path, layout, case):
    path = _eval_file(tmp_path, _bad_paths(layout)[case])
    with pytest.raises(TaskError, match=rf"{path}:2: path_outside_root"):
        load_items(path, "vqa", image_root=layout["root"])


@pytest.mark.parametrize("case", ["dotdot", "absolute", "passwd", "symlink"])
def test_eval_row_outside_root_is_counted_when_not_strict(tmp_path, layout, case):
    path = _eval_file(tmp_path, _bad_paths(layout)[case])
    items, skipped = load_items(path, "vqa", image_root=layout["root"], strict=False)
    assert [it.id for it in items] == ["ok"] and skipped == {"path_outside_root": 1}


def test_eval_absolute_path_needs_the_opt_in(tmp_path, layout):
    path = _eval_file(tmp_path, str(layout["outside"]))
    items, skipped = load_items(path, "vqa", image_root=layout["root"], allow_absolute_paths=True)
    assert [it.id for it in items] == ["ok", "bad"] and skipped == {}
    assert items[1].images[0].load().size == (8, 8)


# -- a huge record is counted in pieces ---------------------------------------------------------
def test_long_text_is_cut_only_between_words_and_rejoins():
    from vlmforge.text.chat import text_pieces

    text = "word " * 50_000 + "tail"
    pieces = text_pieces(text, 1000)
    assert "".join(pieces) == text and len(pieces) > 200
    assert all(len(p) <= 1000 + 5 for p in pieces[:-1]) and all(p.startswith(" ") for p in pieces[1:])


def test_huge_turn_is_counted_in_pieces_to_the_exact_whole_count(tiny_tokenizer_dir):
    """sft-index counted a 10 MB turn with one whole-text encode (~600 bytes per token of Rust
    Encoding: 1.9 GB); it is now counted piece by piece, and the count is the same."""
    from fixtures_tokenizer import shape_sentences

    from vlmforge.text import chat
    from vlmforge.text.tokenization import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    big = " ".join(shape_sentences(6000, seed=1))  # ~250 KB, several pieces
    assert len(big) > 3 * chat.COUNT_PIECE_CHARS
    msgs = [{"role": "user", "content": "Describe it.\n" + big}, {"role": "assistant", "content": big}]
    whole = len(chat.encode_conversation(tok, msgs)[0])  # the whole-text encode
    assert chat.counts_in_pieces(tok)  # so conversation_lengths takes the piecewise path
    assert chat.conversation_lengths(tok, [msgs, msgs[:1] + [{"role": "assistant", "content": "ok"}]])[0] == whole


# -- vision-pretrain objects.jsonl ------------------------------------------------------------------
def test_vision_objects_outside_their_folder_are_counted(tmp_path, layout):
    from vlmforge.vision.pretrain import read_objects

    folder = layout["root"]
    rows = [{"image": "ok.png", "objects": []}, {"image": "../elsewhere/x.png", "objects": []},
            {"image": "link.png", "objects": []}, {"image": str(layout["outside"]), "objects": []}]
    (folder / "objects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images, _, counts = read_objects(folder, 3)
    assert len(images) == 1 and counts == {"rows": 4, "unreadable_image": 0, "path_outside_root": 3}
