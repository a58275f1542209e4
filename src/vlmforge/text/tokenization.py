"""Tokenizers: train a tiny byte-level BPE offline, load any HF tokenizer, encode chats with a loss mask.

The tokenizer we train is a standard transformers tokenizer folder (``tokenizer.json`` +
``tokenizer_config.json`` with a Qwen-shaped chat template), so the same code path loads it and
a real tokenizer such as Qwen2.5's (local folder or hub id) through ``AutoTokenizer``.

Our chat template wraps each assistant reply and its closing ``<|im_end|>`` in
``{% generation %}`` markers, so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
works. Real templates usually lack those markers; :func:`encode_conversation` then finds the
assistant spans by rendering the conversation prefix by prefix (see ``_assistant_char_spans``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from vlmforge.arch.tokens import EOS, IM_END, IM_START, IMAGE_TOKEN, SPECIAL_TOKENS

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

# The pre-tokenizer split Qwen2 / GPT-4 use (digits one by one, contractions, words with a leading space).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    min_frequency: int = 2,
):
    """Train a byte-level BPE on ``texts`` and save a transformers tokenizer folder in ``out_dir``.

    Byte-level means every string round-trips (no unknown token). Returns the loaded tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    tok.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return load_tokenizer(out)


def load_tokenizer(path_or_id: str | os.PathLike, trust_remote_code: bool = False):
    """Load a tokenizer (local folder from ``save_pretrained``/``train_tokenizer``, or hub id) via AutoTokenizer.

    Makes sure ``<image>`` is one special token and a pad token exists (``<|endoftext|>`` when the
    tokenizer has it, else EOS). Adding ``<image>`` to a real tokenizer grows ``len(tokenizer)``
    by one: the model's embeddings must be sized from ``len(tokenizer)``, not ``vocab_size``.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load tokenizer from {str(path_or_id)!r}: {e}") from e
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    """Add what vlmforge needs to any tokenizer: the ``<image>`` special token and a pad token."""
    from tokenizers import AddedToken

    if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        vocab = tok.get_vocab()
        tok.pad_token = EOS if EOS in vocab else tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    ids = tok.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:  # pragma: no cover - guards against exotic tokenizers
        raise ValueError(f"{IMAGE_TOKEN!r} does not encode to one token id (got {ids})")
    return tok


def image_token_id(tok) -> int:
    return int(tok.convert_tokens_to_ids(IMAGE_TOKEN))


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


def read_corpus(paths: Sequence[str | os.PathLike]) -> Iterable[str]:
    """Yield non-empty lines of UTF-8 text files (one sentence/caption per line)."""
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line


def describe(tok) -> dict[str, Any]:
    """A small summary for manifests and `model-info`."""
    return {
        "class": type(tok).__name__,
        "len": len(tok),
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "eos_token": tok.eos_token,
        "image_token_id": image_token_id(tok),
        "chat_template_has_generation_markers": has_generation_markers(tok.chat_template),
    }
