"""The chat template's per-shape fast path (:mod:`vlmforge.text.chat_shapes`) gives exactly what the
template gives: the same ids and loss mask on the synthetic world's conversations and on awkward
ones, with generation markers and without; templates and shapes it cannot follow keep the template
path; the SFT loader's batches are bit for bit the same with the fast path on and off."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random

import numpy as np
import pytest
import torch
from fixtures_tokenizer import QWEN_LIKE_TEMPLATE

from vlmforge.arch.geometry import image_layout
from vlmforge.config import load_recipe
from vlmforge.config.sft import SFTDataConfig
from vlmforge.data.sft.build import build_index
from vlmforge.data.sft.loader import build_sft_loader
from vlmforge.data.sft.records import llava_to_messages
from vlmforge.synth.writer import generate_world
from vlmforge.text import chat_shapes
from vlmforge.text.chat import CHAT_TEMPLATE, client_chat_template, encode_conversation
from vlmforge.text.chat_shapes import (
    ConversationEncoder,
    PieceEncoder,
    content_is_verbatim,
    generation_mask,
    overlap_mask,
)
from vlmforge.text.tokenization import load_tokenizer

WORLD = ["synth.num_captions=10", "synth.samples_per_shard=10", "synth.num_sft=60", "synth.num_mcq=4",
         "synth.num_vqa=4", "synth.num_pope_images=2", "synth.num_preference=2", "synth.num_text=5",
         "synth.num_vision=2", "synth.num_train_mcq=4", "synth.num_train_vqa=2", "synth.num_train_pope_images=1",
         "synth.num_long_answers=1", "synth.num_multi=4", "synth.image_size=32", "synth.sft_multi_turn_frac=0.5",
         "synth.sft_multi_image_frac=0.3", "synth.sft_text_only_frac=0.2"]
# a reply tested for being empty, as Qwen2.5's tool-call branch does
EMPTY_AWARE_TEMPLATE = QWEN_LIKE_TEMPLATE.replace(
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "{%- if message.content %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n(empty)<|im_end|>\\n' }}{%- endif %}")
# shaped like Qwen2.5-Instruct's own template, tool calling included (content tested for being empty)
QWEN25_STYLE_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
TEMPLATES = {
    "generation markers": CHAT_TEMPLATE,
    "no markers": CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", ""),
    "qwen-like": QWEN_LIKE_TEMPLATE,
    "tests content": EMPTY_AWARE_TEMPLATE,
    "qwen2.5-style": QWEN25_STYLE_TEMPLATE,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_world")
    generate_world(load_recipe(None, WORLD), root)
    return root


def awkward(convs: list[list[dict]], seed: int = 0) -> list[list[dict]]:
    """What the world does not write: system prompts (first and later), empty turns, whitespace,
    newlines and markup at the edges, quotes and unicode inside, special tokens written in text."""
    rng = random.Random(seed)
    edges = ["", " ", "\n", "\n\n", "  \t", " \n "]
    inner = ['"quoted" \\ back\\slash {[]} {{ x }} {% y %}', "é ünïcödé 漢字 🙂", "<|im_end|> in text", "<|im_start|>user",
             "a\r\nb", "<image>"]
    out = []
    for conv in convs:
        c = copy.deepcopy(conv)
        for m in c:
            if rng.random() < 0.3:
                m["content"] = rng.choice(edges) + m["content"] + rng.choice(edges)
            if rng.random() < 0.15:
                m["content"] = m["content"] + " " + rng.choice(inner)
            if rng.random() < 0.05:
                m["content"] = ""
        if rng.random() < 0.4:
            c.insert(0, {"role": "system", "content": rng.choice(["Answer briefly.", "  You see shapes.\n", ""])})
        if rng.random() < 0.1:
            c.insert(len(c) // 2, {"role": "system", "content": "Now be verbose."})
        out.append(c)
    return out


def conversations(world) -> list[list[dict]]:
    recs = json.loads((world / "sft" / "llava.json").read_text())
    plain = [llava_to_messages(r)[0] for r in recs]
    return plain + awkward(plain) + awkward(plain, seed=1)


@pytest.fixture(scope="module")
def tiny_tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _with_template(tiny_tokenizer_dir, template: str):
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.chat_template = template
    return tok


def _reference(tok, conv):
    ids, mask = encode_conversation(tok, conv)
    return np.asarray(ids, np.int64), np.asarray(mask, bool)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_fast_path_gives_the_templates_ids_and_mask(world, tiny_tokenizer_dir, name):
    tok = _with_template(tiny_tokenizer_dir, TEMPLATES[name])
    enc = ConversationEncoder(tok)
    assert enc.fast
    convs = conversations(world)
    assert any(sum(m["content"].count("<image>") for m in c) > 1 for c in convs)  # multi-image
    assert any(all("<image>" not in m["content"] for m in c) for c in convs)  # text only
    assert any(sum(m["role"] == "assistant" for m in c) >= 3 for c in convs)  # multi-turn
    for conv in convs:
        ids, mask = enc(conv)
        want_ids, want_mask = _reference(tok, conv)
        assert ids.dtype == np.int64 and mask.dtype == bool
        assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask), conv
    shapes = enc.shapes
    assert len(shapes) > 10 and all(shapes.values())  # every shape on the fast path


def _offsets(rng: np.random.Generator, n: int) -> np.ndarray:
    """Token offsets: in order, some zero-width, some repeated (bytes of one character), some out of order."""
    starts = np.sort(rng.integers(0, 60, n))
    ends = starts + rng.integers(0, 4, n)
    out = np.stack([starts, ends], 1)
    if rng.random() < 0.3 and n > 2:
        i = int(rng.integers(0, n - 1))
        out[[i, i + 1]] = out[[i + 1, i]]
    return out


def _spans(rng: np.random.Generator) -> np.ndarray:
    cuts = np.sort(rng.integers(0, 64, 2 * int(rng.integers(0, 4))))
    return cuts.reshape(-1, 2)


def test_vectorised_masks_follow_the_reference_loops():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        offsets, spans = _offsets(rng, int(rng.integers(0, 30))), _spans(rng)
        # transformers' single pass (apply_chat_template's assistant mask)
        want, at = [0] * len(offsets), 0
        for t, (s, e) in enumerate(offsets):
            while at < len(spans) and s >= spans[at][1]:
                at += 1
            if at == len(spans):
                break
            if e > spans[at][0]:
                want[t] = 1
        assert generation_mask(offsets, spans).tolist() == [bool(x) for x in want]
        # vlmforge's overlap rule (templates without generation markers)
        want = [e > s and any(s < se and e > ss for ss, se in spans) for s, e in offsets]
        assert overlap_mask(offsets, spans).tolist() == want


@pytest.mark.parametrize("template", [
    CHAT_TEMPLATE.replace("message['content'] + '<|im_end|>'", "message['content'] | trim + '<|im_end|>'"),
    CHAT_TEMPLATE.replace("{%- if message['role'] == 'assistant' %}",
                          "{%- if message['role'] == 'assistant' and '</think>' in message['content'] %}"),
    CHAT_TEMPLATE.replace("{%- for message in messages %}",
                          "{%- for message in messages %}{%- set text = message['content'] %}"),
    CHAT_TEMPLATE.replace("message['content'] + '<|im_end|>'", "message['content'][1:] + '<|im_end|>'"),
    CHAT_TEMPLATE.replace("message['content'] + '<|im_end|>'", "message['content'].strip() + '<|im_end|>'"),
    CHAT_TEMPLATE.replace("{%- for message in messages %}",
                          "{%- for message in messages %}{%- for k, v in message.items() %}{%- endfor %}"),
    "{{- strftime_now('%d %b %Y') }}" + CHAT_TEMPLATE,
    client_chat_template(None),  # loops over list content
])
def test_templates_that_look_into_content_keep_the_template_path(tiny_tokenizer_dir, template):
    assert not content_is_verbatim(template)
    tok = _with_template(tiny_tokenizer_dir, template)
    enc = ConversationEncoder(tok)
    assert not enc.fast
    conv = [{"role": "user", "content": " What is </think> here? "}, {"role": "assistant", "content": " A red circle. "}]
    ids, mask = enc(conv)
    want_ids, want_mask = _reference(tok, conv)
    assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)


def test_templates_the_fast_path_follows():
    for template in (*TEMPLATES.values(), "{%- for m in messages %}{{ m.content ~ '\\n' }}{%- endfor %}",
                     "{%- for m in messages %}{%- if m.content is string and not m.content %}-{%- endif %}"
                     "{{ m['content'] }}{%- endfor %}"):
        assert content_is_verbatim(template), template


def test_a_shape_that_disagrees_with_the_template_keeps_the_template_path(tiny_tok, monkeypatch, caplog):
    build = ConversationEncoder._build

    def wrong(self, key):
        shape = build(self, key)
        shape.pieces = [p.replace("assistant", "assistent") for p in shape.pieces]
        return shape

    monkeypatch.setattr(ConversationEncoder, "_build", wrong)
    enc = ConversationEncoder(tiny_tok)
    convs = [[{"role": "user", "content": f"What colour is shape {k}?"}, {"role": "assistant", "content": "Red."}]
             for k in range(3)]
    with caplog.at_level(logging.WARNING, logger=chat_shapes.__name__):
        for conv in convs:
            ids, mask = enc(conv)
            want_ids, want_mask = _reference(tiny_tok, conv)
            assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)
    assert list(enc.shapes.values()) == [False]
    assert sum("disagrees with the template" in r.message for r in caplog.records) == 1


def test_odd_messages_and_a_truncating_backend_take_the_template_path(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    enc = ConversationEncoder(tok)
    conv = [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "The circle is red."}]
    want = _reference(tok, conv)
    assert all(np.array_equal(a, b) for a, b in zip(enc(conv), want))
    tok.backend_tokenizer.enable_truncation(5)  # left set by someone else's call
    assert all(np.array_equal(a, b) for a, b in zip(enc(conv), want))
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
             conv[1]]
    assert all(np.array_equal(a, b) for a, b in zip(enc(parts), _reference(tok, parts)))
    extra = [dict(conv[0], name="me"), conv[1]]
    assert all(np.array_equal(a, b) for a, b in zip(enc(extra), _reference(tok, extra)))
    assert ConversationEncoder(tok, fast=False).shapes == {}


def test_pieces_between_added_tokens_encode_as_the_whole_text(world, tiny_tokenizer_dir):
    from tokenizers import AddedToken

    tok = load_tokenizer(tiny_tokenizer_dir)
    backend = tok.backend_tokenizer
    pieces = PieceEncoder.for_backend(backend)
    assert pieces is not None
    texts = ["", "<image>", "<|im_end|><|im_start|>", "ab<image>cd", "<|im_end", "<|im_start|>user\n\n\n  x  ",
             "é漢<image>🙂 <|endoftext|>\r\n"]
    texts += [tok.apply_chat_template(conv, tokenize=False) for conv in conversations(world)]
    for text in texts * 2:  # the second time from the cache
        want = backend.encode(text, add_special_tokens=False)
        ids, offsets = pieces.encode(text)
        assert ids.tolist() == want.ids and [tuple(o) for o in offsets.tolist()] == want.offsets, text
    stripping = load_tokenizer(tiny_tokenizer_dir)
    stripping.add_tokens([AddedToken("<box>", lstrip=True, special=True)], special_tokens=True)
    assert PieceEncoder.for_backend(stripping.backend_tokenizer) is None
    from tokenizers import normalizers

    lowering = load_tokenizer(tiny_tokenizer_dir)
    lowering.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert PieceEncoder.for_backend(lowering.backend_tokenizer) is None


# ----------------------------------------------------------------------------- the loader


def _digest(batch: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        t = batch[k]
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def indexes(world, tiny_tokenizer_dir, tmp_path_factory):
    """The world's SFT file plus its awkward variants as LLaVA records; indexed on a fixed grid and tiled."""
    out = tmp_path_factory.mktemp("chat_idx")
    recs = json.loads((world / "sft" / "llava.json").read_text())
    extra = []
    for rec, conv in zip(recs, awkward([llava_to_messages(r)[0] for r in recs], seed=2)):
        who = {"user": "human", "assistant": "gpt", "system": "system"}
        if sum(m["content"].count("<image>") for m in conv) == len(llava_to_messages(rec)[1]):
            extra.append({**{k: v for k, v in rec.items() if k in ("image",)},
                          "conversations": [{"from": who[m["role"]], "value": m["content"]} for m in conv]})
    (out / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs + extra))
    tok = load_tokenizer(tiny_tokenizer_dir)
    made = {}
    for name, over in (("fixed", ["model.projector.pool_size=2"]),
                       ("tiled", ["model.projector.pool_size=2", "model.images.tiles=true", "model.images.max_tiles=4"])):
        cfg = load_recipe("tiny/sft", over)
        build_index([out / "sft.jsonl"], out / name, layout=image_layout(cfg.model, tok), image_root=world / "sft",
                    tokenizer=tiny_tokenizer_dir, progress=False)
        made[name] = (out / name, over)
    return made


@pytest.mark.parametrize("layout,batching,jpeg,workers,ranks", [
    ("fixed", "length_group", False, 0, 1),
    ("fixed", "pack", True, 0, 2),
    ("tiled", "pack", False, 0, 1),
    ("tiled", "length_group", True, 2, 2),
    ("fixed", "pack", False, 1, 1),
])
def test_loader_batches_are_the_same_with_and_without_the_fast_path(indexes, world, tiny_tok, layout, batching, jpeg,
                                                                    workers, ranks):
    torch.set_num_threads(1)
    index, over = indexes[layout]
    cfg = load_recipe("tiny/sft", over)
    sft = SFTDataConfig(index=str(index), image_root=str(world / "sft"), max_len=512, pack_window=40, batching=batching,
                        num_workers=workers, jpeg_augment=jpeg)
    runs = {}
    for fast in (True, False):
        digests = []
        for rank in range(ranks):
            loader = build_sft_loader(cfg, tiny_tok, batch_size=2, sft_cfg=sft, seed=4, rank=rank, world_size=ranks)
            assert loader.ds.chat.fast
            if not fast:
                loader.ds.chat = ConversationEncoder(tiny_tok, fast=False)
            for _ in range(2):  # two epochs: the JPEG qualities are drawn again
                digests += [_digest(b) for b in loader]
            digests.append(json.dumps(loader.skipped, sort_keys=True))
        runs[fast] = digests
    assert len(runs[True]) > 10 and runs[True] == runs[False]
