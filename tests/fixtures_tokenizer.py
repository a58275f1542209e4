"""Shared tokenizer fixture: a tiny byte-level BPE trained on generated sentences.

conftest.py registers this module as a plugin, so any test can ask for the ``tiny_tokenizer_dir``
fixture: a folder ``load_tokenizer`` / AutoTokenizer loads.
"""

from __future__ import annotations

import random

import pytest

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "rectangle"]
SIZES = ["small", "large", "tiny", "big"]
PLACES = ["left", "right", "top", "bottom", "center"]
CHAT = [
    "What is in the picture?",
    "Describe the image.",
    "How many shapes are there?",
    "What colour is the {s}?",
    "Is there a {c} {s}?",
    "Yes.",
    "No.",
    "There are {n} shapes.",
    "The {s} is {c}.",
    "Answer with one word.",
]


def shape_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Captions and chat-ish lines about coloured shapes (a stand-in for the synthetic world's corpus)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c, c2 = rng.choice(COLOURS), rng.choice(COLOURS)
        s, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        if rng.random() < 0.6:
            out.append(
                f"A {rng.choice(SIZES)} {c} {s} at the {rng.choice(PLACES)}, next to a {c2} {s2}."
            )
        else:
            out.append(rng.choice(CHAT).format(c=c, s=s, n=rng.randint(1, 9)))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """Folder of a trained tiny tokenizer (vocab 512, special tokens + chat template with generation markers)."""
    from vlmforge.text.tokenization import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(shape_sentences(), out, vocab_size=512, min_frequency=2)
    return str(out)


# Qwen2.5-Instruct's template minus tool calling: no generation markers (like the real one).
QWEN_LIKE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
