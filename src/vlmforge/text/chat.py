"""Chat encoding: the Qwen-shaped chat template and conversations -> (input_ids, assistant mask).

Our chat template wraps each assistant reply and its closing ``<|im_end|>`` in
``{% generation %}`` markers, so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
works. Real templates usually lack those markers; :func:`encode_conversation` then finds the
assistant spans by rendering the conversation prefix by prefix (see ``assistant_char_spans``).
"""

from __future__ import annotations

import json
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

# Put before any chat template: rewrites content-part messages (the form multimodal clients send)
# into string messages exactly as flatten_content does, then the template that follows renders
# them; string messages pass through untouched, so their rendering stays byte-identical.
CONTENT_PARTS_PRELUDE = (
    "{#- vlmforge: content parts -> string content (image part = '" + IMAGE_TOKEN + "' + newline) #}"
    "{%- set vlmforge_flat = namespace(messages=[]) %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}"
    "{%- set vlmforge_flat.messages = vlmforge_flat.messages + [message] %}"
    "{%- else %}"
    "{%- set vlmforge_text = namespace(value='') %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}"
    "{%- set vlmforge_next = loop.nextitem %}"
    "{%- set vlmforge_text.value = vlmforge_text.value + '" + IMAGE_TOKEN + "' %}"
    "{%- if not (vlmforge_next is defined and vlmforge_next['type'] == 'text'"
    " and vlmforge_next['text'].startswith('\\n')) %}"
    "{%- set vlmforge_text.value = vlmforge_text.value + '\\n' %}"
    "{%- endif %}"
    "{%- elif part['type'] == 'text' %}"
    "{%- set vlmforge_text.value = vlmforge_text.value + part['text'] %}"
    "{%- else %}"
    "{{- raise_exception('content part type ' ~ part['type'] ~ ' is not supported (image, text)') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set vlmforge_flat.messages = vlmforge_flat.messages + [{'role': message['role'], 'content': vlmforge_text.value}] %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set messages = vlmforge_flat.messages %}"
)


def client_chat_template(template: str | None) -> str:
    """The chat template an export ships: ``template`` (vlmforge's when None) with
    :data:`CONTENT_PARTS_PRELUDE` in front, so it renders string content as ``template`` does and
    content parts as :func:`flatten_content` flattens them. Idempotent."""
    template = template or CHAT_TEMPLATE
    return template if template.startswith(CONTENT_PARTS_PRELUDE) else CONTENT_PARTS_PRELUDE + template


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and bool(_GENERATION_TAG.search(template))


def flatten_content(parts: Sequence[dict]) -> str:
    """Content parts (the HF / OpenAI multimodal form) as one string, the way vlmforge's own prompts
    are written: each image part is an ``<image>`` marker followed by a newline (no newline when
    the next part is text that starts with one), text parts as they are, in order. So
    ``[image, text "Q"]`` is ``"<image>\\nQ"`` and ``[image, image, text "Q"]`` is
    ``"<image>\\n<image>\\nQ"``, as eval and LLaVA SFT records write them. :func:`client_chat_template`
    renders content parts the same way."""
    out = []
    for k, part in enumerate(parts):
        if part.get("type") == "image":
            nxt = parts[k + 1] if k + 1 < len(parts) else None
            joined = nxt is not None and nxt.get("type") == "text" and str(nxt.get("text", "")).startswith("\n")
            out.append(IMAGE_TOKEN if joined else IMAGE_TOKEN + "\n")
        else:
            out.append(str(part.get("text", "")))
    return "".join(out)


def _normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Chat messages as ``{"role", "content": str}``; list content (HF multimodal form) is flattened
    by :func:`flatten_content`."""
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system/user/assistant, got {role!r}")
        if isinstance(content, list):
            content = flatten_content(content)
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _render(tok, messages, template, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tok, messages, template) -> tuple[str, list[tuple[int, int]]] | None:
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
    got = assistant_char_spans(tok, msgs, template)
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
        if any(len(t) > COUNT_PIECE_CHARS for t in texts) and counts_in_pieces(tok):
            return _piecewise_lengths(backend, texts)
        return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]  # pragma: no cover


# Counting a very long text in one call builds a Rust Encoding that holds ids, offsets, token
# strings and masks for every token at once, so one huge turn costs gigabytes. Such texts are counted in pieces of about
# COUNT_PIECE_CHARS, cut where a byte-level BPE's pre-tokenizer cuts anyway, so the sum is exact.
COUNT_PIECE_CHARS = 1 << 16
_COUNT_BATCH_CHARS = 1 << 20  # characters encoded per batch call while counting in pieces
_CUT = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")  # a space between two ASCII letters
_NORMALIZERS_OK = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
_PRETOKENIZERS_OK = {"ByteLevel", "Split", "Digits"}
_PROBE = "Count me in pieces: the quick brown fox, it's 42 o'clock; ab cd\n\nnew line  two  spaces end."


def text_pieces(text: str, limit: int = COUNT_PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of about ``limit`` characters (longer only where no cut point
    follows), each cut before a space between two ASCII letters; ``"".join`` gives ``text`` back."""
    pieces, pos = [], 0
    while len(text) - pos > limit:
        m = _CUT.search(text, pos + limit)
        if m is None:
            break
        pieces.append(text[pos : m.start()])
        pos = m.start()
    pieces.append(text[pos:])
    return pieces


def _kinds(node) -> list[str]:
    """Component types of a tokenizer.json normalizer/pre_tokenizer node (Sequence flattened)."""
    if not node:
        return []
    subs = node.get("normalizers") or node.get("pretokenizers")
    if node.get("type") == "Sequence" and subs is not None:
        return [k for sub in subs for k in _kinds(sub)]
    return [node.get("type")]


def counts_in_pieces(tok) -> bool:
    """Whether counting in :func:`text_pieces` gives exactly the whole text's count: a byte-level
    BPE whose normalizer and pre-tokenizer act locally, no added token containing a space, and
    the cut checked on a probe text (cached on the tokenizer)."""
    cached = getattr(tok, "_vlmforge_splittable", None)
    if cached is not None:
        return cached
    ok = False
    try:
        backend = tok.backend_tokenizer
        spec = json.loads(backend.to_str())
        pre = _kinds(spec.get("pre_tokenizer"))
        ok = (
            (spec.get("model") or {}).get("type") == "BPE"
            and "ByteLevel" in pre
            and set(pre) <= _PRETOKENIZERS_OK
            and set(_kinds(spec.get("normalizer"))) <= _NORMALIZERS_OK
            and not any(" " in t.get("content", "") for t in spec.get("added_tokens", []))
        )
        if ok:
            probe = _PROBE * 3
            whole = len(backend.encode(probe, add_special_tokens=False).ids)
            parts = text_pieces(probe, 1)  # every cut point
            ok = whole == sum(len(e.ids) for e in backend.encode_batch(parts, add_special_tokens=False))
    except Exception:  # an unusual tokenizer: count whole texts, as before
        ok = False
    try:
        tok._vlmforge_splittable = ok
    except AttributeError:  # pragma: no cover - a tokenizer object without a __dict__
        pass
    return ok


def _piecewise_lengths(backend, texts: list[str]) -> list[int]:
    """Token counts of ``texts``, each long one encoded piece by piece, at most
    ``_COUNT_BATCH_CHARS`` characters per batch call, so no Encoding of a whole long text is built."""
    counts = [0] * len(texts)
    batch: list[str] = []
    owner: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal size
        for i, e in zip(owner, backend.encode_batch(batch, add_special_tokens=False)):
            counts[i] += len(e.ids)
        batch.clear()
        owner.clear()
        size = 0

    for i, text in enumerate(texts):
        for piece in text_pieces(text) if len(text) > COUNT_PIECE_CHARS else [text]:
            batch.append(piece)
            owner.append(i)
            size += len(piece)
            if size >= _COUNT_BATCH_CHARS:
                flush()
    if batch:
        flush()
    return counts
