"""Token ids of a preference pair, the same way the index counts them and the loader builds them.

The prompt is the chat template of one user turn with the generation prompt
(:func:`vlmforge.text.chat.encode_conversation`), each ``<image>`` one id (the loader expands it to
the model's visual tokens); a response is ``tokenizer(text, add_special_tokens=False)`` plus the
``<|im_end|>`` id, as :mod:`vlmforge.model.likelihood` scores answers. The batched counters give
the lengths of many pairs in one tokenizer call each (for indexing a million pairs).
"""

from __future__ import annotations

from typing import Sequence

from vlmforge.arch.tokens import IM_END
from vlmforge.text.chat import CHAT_TEMPLATE, encode_conversation


def end_of_turn_id(tok) -> int:
    end = tok.convert_tokens_to_ids(IM_END)
    if end is None or end == tok.unk_token_id:
        raise ValueError(f"the tokenizer has no {IM_END} token (responses end with it)")
    return int(end)


def prompt_ids(tok, question: str) -> list[int]:
    """Chat-template ids of the user turn ``question`` plus the generation prompt (``<image>`` = one id)."""
    return list(encode_conversation(tok, [{"role": "user", "content": question}], add_generation_prompt=True)[0])


def response_ids(tok, text: str, end_id: int) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) + [end_id]


def prompt_lengths(tok, questions: Sequence[str]) -> list[int]:
    """``len(prompt_ids(tok, q))`` for many questions: rendered one by one, tokenized in one batch.

    A user-only conversation renders the same with or without generation markers in the template
    (encode_conversation's mask is not needed here), so the text is the template's output."""
    if not questions:
        return []
    template = tok.chat_template or CHAT_TEMPLATE
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], chat_template=template, tokenize=False,
                                add_generation_prompt=True)
        for q in questions
    ]
    return _counts(tok, texts)


def response_lengths(tok, texts: Sequence[str]) -> list[int]:
    """``len(response_ids(tok, t, end))`` for many texts, in one tokenizer call."""
    if not texts:
        return []
    return [n + 1 for n in _counts(tok, list(texts))]


def _counts(tok, texts: list[str]) -> list[int]:
    """Token counts of ``texts`` as ``tok(text, add_special_tokens=False)`` gives them: straight from
    the Rust backend when there is one (no offsets, no Python objects per token)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # pragma: no cover - a slow (Python) tokenizer
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [len(e.ids) for e in encode(texts, add_special_tokens=False)]
