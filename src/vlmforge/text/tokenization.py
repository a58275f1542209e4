"""Tokenizers: train a tiny byte-level BPE offline, load any HF tokenizer, describe one.

The tokenizer we train is a standard transformers tokenizer folder (``tokenizer.json`` +
``tokenizer_config.json`` with the Qwen-shaped chat template of :mod:`vlmforge.text.chat`), so
the same code path loads it and a real tokenizer such as Qwen2.5's (local folder or hub id)
through ``AutoTokenizer``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlmforge.arch.tokens import EOS, IM_END, IM_START, IMAGE_TOKEN, SPECIAL_TOKENS
from vlmforge.errors import UserError
from vlmforge.text.chat import CHAT_TEMPLATE, has_generation_markers

# The pre-tokenizer split Qwen2 / GPT-4 use (digits one by one, contractions, words with a leading space).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    min_frequency: int = 2,
):
    """Train a byte-level BPE on ``texts`` and save a transformers tokenizer folder in ``out_dir``.

    Byte-level means every string round-trips (no unknown token). Returns the loaded tokenizer.
    """
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


def looks_local(path: str, *, bare_name_is_local: bool = False) -> bool:
    """Whether ``path`` names a local folder rather than a hub id, by its shape alone.

    Hub ids look like "name" or "org/name"; an absolute, ./, ~ or deeper path is a local folder.
    ``bare_name_is_local`` also takes a bare "name" (no slash) for a local folder, for callers
    that accept only "org/name" hub ids.
    """
    if bare_name_is_local and "/" not in path:
        return True
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep in path.replace("/", "")


def load_tokenizer(path_or_id: str | os.PathLike, trust_remote_code: bool = False, key: str = "tokenizer.path"):
    """Load a tokenizer (local folder from ``save_pretrained``/``train_tokenizer``, or hub id) via AutoTokenizer.

    Makes sure ``<image>`` is one special token and a pad token exists (``<|endoftext|>`` when the
    tokenizer has it, else EOS). Adding ``<image>`` to a real tokenizer grows ``len(tokenizer)``
    by one: the model's embeddings must be sized from ``len(tokenizer)``, not ``vocab_size``.
    """
    path = str(path_or_id)
    if not os.path.exists(path) and looks_local(path):  # (a hub id that fails, e.g. offline, is one line below)
        raise UserError(f"{key} {path}: no such folder; give a tokenizer folder (`vlmforge tokenizer train`) or a hub id")
    try:
        tok = AutoTokenizer.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]  # transformers' messages run over lines
        if not os.path.exists(path):
            first_line = f"no local folder {path}, and as a hub id: {first_line}"
        raise UserError(f"{key}: cannot load tokenizer from {str(path_or_id)!r}: {first_line}") from e
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    """Add what vlmforge needs to any tokenizer: the ``<image>`` special token and a pad token."""
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


def tokenizer_fingerprint(tok) -> dict[str, Any]:
    """What data made with one tokenizer needs of another: ``sha256`` over the whole vocabulary
    (every token and its id, added tokens with their special flag) and the ids of the special
    tokens vlmforge uses (``<image>``, ``<|im_end|>``, eos, pad); ``len`` and ``special_ids`` for
    messages. ``pack`` and ``sft-index`` record it in their manifest, ``train`` compares it."""
    special = {"image": IMAGE_TOKEN, "im_end": IM_END, "eos": tok.eos_token, "pad": tok.pad_token}
    ids = {k: (None if t is None else int(tok.convert_tokens_to_ids(t))) for k, t in special.items()}
    vocab = sorted((int(i), str(t)) for t, i in tok.get_vocab().items())
    added = sorted((int(i), str(t.content), bool(t.special)) for i, t in tok.added_tokens_decoder.items())
    blob = json.dumps({"vocab": vocab, "added": added, "special_ids": ids}, ensure_ascii=False, separators=(",", ":"))
    return {"sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(), "len": len(tok), "special_ids": ids}


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
