"""Content parts (the multimodal clients' message form): vlmforge's own flattening and the exported
chat template agree, and string content renders byte for byte as the training template does."""

from __future__ import annotations

import pytest

from vlmforge.model.decoding import end_of_turn_ids
from vlmforge.text.chat import (
    CHAT_TEMPLATE,
    CONTENT_PARTS_PRELUDE,
    client_chat_template,
    encode_conversation,
    flatten_content,
)
from vlmforge.text.tokenization import load_tokenizer

IMG, TXT = {"type": "image"}, (lambda t: {"type": "text", "text": t})
# A template without generation markers whose messages must be strings (the shape of Qwen2.5's).
PLAIN_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.mark.parametrize("parts, text", [
    ([IMG, TXT("What is it?")], "<image>\nWhat is it?"),
    ([IMG, TXT("\nWhat is it?")], "<image>\nWhat is it?"),  # the newline is not doubled
    ([IMG, IMG, TXT("Compare.")], "<image>\n<image>\nCompare."),
    ([TXT("Look: "), IMG, TXT("and "), IMG], "Look: <image>\nand <image>\n"),
    ([TXT("a"), TXT("b")], "ab"),
])
def test_flatten_content_places_images_as_vlmforge_prompts_do(parts, text):
    assert flatten_content(parts) == text


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, PLAIN_TEMPLATE], ids=["vlmforge", "plain"])
def test_client_template_renders_parts_as_vlmforge_flattens_them(tok, template):
    exported = client_chat_template(template)
    assert exported.startswith(CONTENT_PARTS_PRELUDE) and client_chat_template(exported) == exported
    parts = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [IMG, IMG, TXT("Q")]},
             {"role": "assistant", "content": [TXT("A.")]}, {"role": "user", "content": [TXT("More: "), IMG]}]
    strings = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else flatten_content(m["content"])}
               for m in parts]
    for gen in (False, True):
        render = tok.apply_chat_template(parts, chat_template=exported, tokenize=False, add_generation_prompt=gen)
        assert render == tok.apply_chat_template(strings, chat_template=template, tokenize=False, add_generation_prompt=gen)
        # string content: byte for byte what training renders
        assert tok.apply_chat_template(strings, chat_template=exported, tokenize=False, add_generation_prompt=gen) == \
            tok.apply_chat_template(strings, chat_template=template, tokenize=False, add_generation_prompt=gen)
    # and vlmforge's own encoding of content parts is the exported template's (mask included, for ours)
    ids, mask = encode_conversation(tok, parts, chat_template=template)
    assert (ids, mask) == encode_conversation(tok, strings, chat_template=template)
    assert ids == tok(tok.apply_chat_template(parts, chat_template=exported, tokenize=False), add_special_tokens=False)["input_ids"]


def test_client_template_keeps_generation_markers(tok):
    conv = [{"role": "user", "content": [IMG, TXT("Q")]}, {"role": "assistant", "content": "A."}]
    out = tok.apply_chat_template(conv, chat_template=client_chat_template(CHAT_TEMPLATE), tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    assert (list(out["input_ids"]), list(out["assistant_masks"])) == encode_conversation(tok, conv)


def test_end_of_turn_ids_lists_im_end_first(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok) == [im_end, tok.eos_token_id]
