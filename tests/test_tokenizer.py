"""Tokenizer: training offline, round trip, special tokens, chat template loss mask."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures_tokenizer import QWEN_LIKE_TEMPLATE, shape_sentences

from vlmforge.arch.tokens import EOS, IM_END, IM_START, IMAGE_TOKEN
from vlmforge.text.chat import CHAT_TEMPLATE, conversation_lengths, encode_conversation, has_generation_markers
from vlmforge.text.tokenization import load_tokenizer

CONV = [
    {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat colour is the circle?"},
    {"role": "assistant", "content": "The circle is red."},
    {"role": "user", "content": "How many shapes are there?"},
    {"role": "assistant", "content": "There are 3 shapes."},
]



@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def test_folder_is_standard_and_loads_with_autotokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    files = set(p.name for p in Path(tiny_tokenizer_dir).iterdir())
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    raw = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert raw.pad_token == EOS and raw.eos_token == EOS
    assert has_generation_markers(raw.chat_template)
    assert 300 < len(raw) <= 512


@pytest.mark.parametrize(
    "text",
    ["A small red circle at the left.", "  odd   spacing\n\nnew lines\t", "unicode: é ü 日本 😀", "", "<image>x"],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
    for t in (EOS, IM_START, IM_END, IMAGE_TOKEN):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    ids = tok.encode(f"look{IMAGE_TOKEN}{IMAGE_TOKEN} here", add_special_tokens=False)
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(img) == 2
    assert tok.pad_token_id == tok.convert_tokens_to_ids(EOS)


def test_chat_shape_matches_qwen(tok):
    text = tok.apply_chat_template(CONV[:2], tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_TOKEN}\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nThe circle is red.<|im_end|>\n"
    )
    gen = tok.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n")


def _supervised_pieces(tok, ids, mask):
    """Decode each maximal run of masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_assistant_mask_covers_exactly_assistant_tokens(tok):
    ids, mask = encode_conversation(tok, CONV)
    assert len(ids) == len(mask)
    assert _supervised_pieces(tok, ids, mask) == ["The circle is red.<|im_end|>", "There are 3 shapes.<|im_end|>"]
    # Exactly: the masked tokens are the tokens of reply + <|im_end|>, in place.
    text = tok.decode(ids)
    assert text == tok.apply_chat_template(CONV, tokenize=False)
    reply_ids = tok.encode("The circle is red." + IM_END, add_special_tokens=False)
    first = mask.index(1)
    assert ids[first : first + len(reply_ids)] == reply_ids
    assert sum(mask) == len(reply_ids) + len(tok.encode("There are 3 shapes." + IM_END, add_special_tokens=False))
    # The token after each supervised run is the "\n" that is not supervised.
    nl = tok.encode("\n", add_special_tokens=False)
    assert ids[first + len(reply_ids) : first + len(reply_ids) + len(nl)] == nl
    assert mask[first + len(reply_ids)] == 0


def test_mask_without_generation_markers_matches(tok):
    """A real-model template (no {% generation %}) gives the same ids and the same mask."""
    plain = CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert not has_generation_markers(plain)
    ref = encode_conversation(tok, CONV)
    assert encode_conversation(tok, CONV, chat_template=plain) == ref
    assert encode_conversation(tok, CONV, chat_template=QWEN_LIKE_TEMPLATE) == ref
    with_sys = [{"role": "system", "content": "Be brief."}] + CONV
    a = encode_conversation(tok, with_sys)
    b = encode_conversation(tok, with_sys, chat_template=QWEN_LIKE_TEMPLATE)
    assert a == b
    assert _supervised_pieces(tok, *b) == ["The circle is red.<|im_end|>", "There are 3 shapes.<|im_end|>"]


def test_second_tokenizer_folder_without_markers(tok, tiny_tokenizer_dir, tmp_path):
    """A saved tokenizer whose own template lacks markers (like Qwen2.5's) loads and masks correctly."""
    d = tmp_path / "qwenlike"
    shutil.copytree(tiny_tokenizer_dir, d)
    (d / "chat_template.jinja").write_text(QWEN_LIKE_TEMPLATE)
    tok2 = load_tokenizer(d)
    assert not has_generation_markers(tok2.chat_template)
    assert encode_conversation(tok2, CONV) == encode_conversation(tok, CONV)


def test_prefix_inconsistent_template_falls_back(tok):
    """A template that rewrites earlier turns cannot be masked by prefixes: fall back to ours."""
    weird = QWEN_LIKE_TEMPLATE.replace("message.content", "(message.content if loop.last else 'x')")
    assert encode_conversation(tok, CONV, chat_template=weird) == encode_conversation(tok, CONV)


def test_generation_prompt_and_list_content(tok):
    ids, mask = encode_conversation(tok, CONV[:1], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and sum(mask) == 0
    listed = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour is the circle?"}]},
        CONV[1],
    ]
    assert encode_conversation(tok, listed) == encode_conversation(tok, CONV[:2])


def test_load_adds_image_token_to_foreign_tokenizer(tiny_tokenizer_dir, tmp_path):
    """A tokenizer without <image> (e.g. Qwen2.5's) gets it as one new special token."""
    from tokenizers import Tokenizer

    d = tmp_path / "noimage"
    shutil.copytree(tiny_tokenizer_dir, d)
    data = json.loads((d / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != IMAGE_TOKEN]
    # Keep the vocab consistent: drop <image> from the model vocab too.
    data["model"]["vocab"].pop(IMAGE_TOKEN, None)
    (d / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for k in ("extra_special_tokens", "additional_special_tokens"):
        if isinstance(cfg.get(k), list):
            cfg[k] = [t for t in cfg[k] if t != IMAGE_TOKEN]
    for k, v in list(cfg.get("added_tokens_decoder", {}).items()):
        if v.get("content") == IMAGE_TOKEN:
            del cfg["added_tokens_decoder"][k]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert IMAGE_TOKEN not in Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab()
    tok = load_tokenizer(d)
    ids = tok.encode(f"a{IMAGE_TOKEN}b", add_special_tokens=False)
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert img in ids and len(ids) == 3


def test_cli_train_and_info(tmp_path, capsys):
    from vlmforge.cli import main

    corpus = tmp_path / "world" / "text" / "corpus.txt"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("\n".join(shape_sentences(300, seed=1)) + "\n")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "400"]) == 0
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "world"), "--out", str(tmp_path / "t2")]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "tokenizer" and man["counts"]["lines"] == 300
    assert (out / "config.yaml").is_file()
    tok = load_tokenizer(out)
    assert len(tok) <= 400
    assert main(["tokenizer", "info", str(out)]) == 0
    assert "[[A red circle.<|im_end|>]]" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert main(["tokenizer", "info", str(tmp_path / "nope")]) == 2


def test_batched_lengths_match_encode_conversation(tok):
    convs = [CONV, CONV[:2], [{"role": "system", "content": "Be brief."}] + CONV[2:]]
    want = [len(encode_conversation(tok, c)[0]) for c in convs]
    assert conversation_lengths(tok, convs) == want
    assert conversation_lengths(tok, convs, chat_template=QWEN_LIKE_TEMPLATE) == want


def test_save_pretrained_round_trip(tok, tmp_path):
    """A loaded tokenizer saved again (as checkpoints do in tokenizer/) loads back identically."""
    tok.save_pretrained(str(tmp_path / "again"))
    tok2 = load_tokenizer(tmp_path / "again")
    assert len(tok2) == len(tok) and tok2.pad_token_id == tok.pad_token_id
    assert tok2.convert_tokens_to_ids(IMAGE_TOKEN) == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert encode_conversation(tok2, CONV) == encode_conversation(tok, CONV)


def test_world_folder_covers_the_instruction_prompts(tmp_path):
    """`--corpus WORLD` also reads the world's SFT turns and the chat template's words, so the
    prompt suffixes and the template around every turn are about a token per word, not dozens of
    pieces."""
    from vlmforge.cli import main
    from vlmforge.synth.language import MCQ_SUFFIX

    world = tmp_path / "world"
    (world / "text").mkdir(parents=True)
    (world / "text" / "corpus.txt").write_text("\n".join(shape_sentences(300, seed=1)) + "\n")
    sft = [{"id": str(i), "image": "x.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nWhat color is the circle?\nA. red\nB. blue\n{MCQ_SUFFIX}"},
        {"from": "gpt", "value": "A"}]} for i in range(50)]
    only_text = tmp_path / "only_text"
    assert main(["tokenizer", "train", "--corpus", str(world / "text" / "corpus.txt"), "--out", str(only_text)]) == 0
    (world / "sft").mkdir()
    (world / "sft" / "llava.json").write_text(json.dumps(sft))
    assert main(["tokenizer", "train", "--corpus", str(world), "--out", str(tmp_path / "tok")]) == 0
    man = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    # per conversation: "system", the system prompt, a role word per turn, the turns' 5 lines
    assert man["counts"]["lines"] == 300 + 50 * (2 + 2 + 5) and any(p.endswith("llava.json") for p in man["inputs"])
    n_with = len(load_tokenizer(tmp_path / "tok").encode(MCQ_SUFFIX, add_special_tokens=False))
    n_without = len(load_tokenizer(only_text).encode(MCQ_SUFFIX, add_special_tokens=False))
    assert n_with <= 13 and n_without >= 2 * n_with  # about one token per word vs word pieces
    assert "<image>" not in (tmp_path / "tok" / "tokenizer.json").read_text().split('"merges"')[1]
    scaffold = load_tokenizer(tmp_path / "tok").apply_chat_template(
        [{"role": "user", "content": "red"}, {"role": "assistant", "content": "A"}], tokenize=False)
    pieces = [len(load_tokenizer(t).encode(scaffold, add_special_tokens=False)) for t in (tmp_path / "tok", only_text)]
    assert pieces[0] <= 26 and pieces[1] >= 2 * pieces[0], pieces
