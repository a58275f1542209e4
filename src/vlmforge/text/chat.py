"""Chat encoding: the Qwen-shaped chat template and conversations -> (input_ids, assistant mask).

Our chat template wraps each assistant reply and its closing ``<|im_end|>`` in
``{% generation %}`` markers, so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
works. Real templates usually lack those markers; :func:`encode_conversation` then finds the
assistant spans by rendering the conversation prefix by prefix (see ``_assistant_char_spans``).
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

from vlmforge.arch.tokens import IMAGE_TOKEN

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5's shape (default system prompt when none is given), with generation markers around
# what the model must learn to produce: the reply and its closing <|im_end|> (not the newline after it).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and bool(_GENERATION_TAG.search(template))


def _normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Chat messages as ``{"role", "content": str}``; list content (HF multimodal form) is flattened,
    an image part becoming the ``<image>`` marker."""
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system/user/assistant, got {role!r}")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                parts.append(IMAGE_TOKEN if kind == "image" else str(part.get("text", "")))
            content = "".join(parts)
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _render(tok, messages, template, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_char_spans(tok, messages, template) -> tuple[str, list[tuple[int, int]]] | None:
    """Render prefix by prefix: the text an assistant turn adds after the generation prompt is its
    reply (+ end-of-turn token); trailing whitespace is not supervised. None if the template is not
    prefix-consistent (e.g. it rewrites earlier turns), so the caller can fall back."""
    full = _render(tok, messages, template, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], template, add_generation_prompt=True) if i else ""
        through = _render(tok, messages[: i + 1], template, add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            return None
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return full, spans


def _mask_from_spans(tok, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [0] * len(ids)
    for t, (s, e) in enumerate(offsets):
        if e > s and any(s < se and e > ss for ss, se in spans):
            mask[t] = 1
    return ids, mask


def encode_conversation(
    tok,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = False,
    chat_template: str | None = None,
) -> tuple[list[int], list[int]]:
    """Apply the chat template; return ``(input_ids, assistant_mask)`` with mask 1 on exactly the
    tokens of each assistant reply and its end-of-turn token (what SFT puts in the loss).

    ``<image>`` markers stay one token each; the data layer expands them to N visual tokens.
    Templates with ``{% generation %}`` markers use transformers' own mask; others (e.g. Qwen2.5's)
    are rendered prefix by prefix; a template that is not prefix-consistent falls back to our
    Qwen-shaped template with a warning.
    """
    msgs = _normalize_messages(messages)
    if not msgs:
        raise ValueError("empty conversation")
    template = chat_template or tok.chat_template or CHAT_TEMPLATE
    if has_generation_markers(template):
        out = tok.apply_chat_template(
            msgs,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
        )
        return list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]
    got = _assistant_char_spans(tok, msgs, template)
    if got is None:
        log.warning("chat template is not prefix-consistent; using vlmforge's Qwen-shaped template for SFT")
        return encode_conversation(tok, msgs, add_generation_prompt=add_generation_prompt, chat_template=CHAT_TEMPLATE)
    text, spans = got
    if add_generation_prompt:
        text = _render(tok, msgs, template, add_generation_prompt=True)
    return _mask_from_spans(tok, text, spans)


def conversation_lengths(tok, conversations: Sequence[Sequence[dict]], chat_template: str | None = None) -> list[int]:
    """Token counts of many conversations, as ``len(encode_conversation(...)[0])`` would give, but
    rendered once each and tokenized in one batch by the Rust backend (for indexing millions)."""
    template = chat_template or tok.chat_template or CHAT_TEMPLATE
    texts = [_render(tok, _normalize_messages(m), template, add_generation_prompt=False) for m in conversations]
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]  # pragma: no cover
