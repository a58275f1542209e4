"""Token lengths of SFT conversations: ``exact`` (the tokenizer's chat template, the same call the
dataset makes) or ``estimate`` (UTF-8 bytes / bytes-per-token + per-turn overhead; bytes-per-token
and the overheads calibrated on the first records when a tokenizer is given)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.text.chat import conversation_lengths, encode_conversation
from vlmforge.text.tokenization import load_tokenizer

_TOKENIZERS: dict[str, Any] = {}


def text_bytes(msgs: list[dict]) -> int:
    """UTF-8 bytes of the messages' text, each ``<image>`` marker counted as one byte."""
    return sum(len(m["content"].encode("utf-8")) - (len(IMAGE_TOKEN) - 1) * m["content"].count(IMAGE_TOKEN)
               for m in msgs)


@dataclass
class LengthModel:
    """How text token lengths are measured: ``exact`` (tokenizer folder) or ``estimate``."""

    mode: str = "estimate"
    tokenizer: str | None = None
    bytes_per_token: float = 4.0
    turn_overhead: int = 5  # <|im_start|> role \n ... <|im_end|> \n
    conversation_overhead: int = 10  # the default system prompt of a Qwen-shaped template
    _tok: Any = field(default=None, repr=False)

    def tok(self):
        if self._tok is None:
            if self.tokenizer not in _TOKENIZERS:  # once per process, not once per job
                _TOKENIZERS[self.tokenizer] = load_tokenizer(self.tokenizer)
            self._tok = _TOKENIZERS[self.tokenizer]
        return self._tok

    def exact(self, msgs: list[dict]) -> int:
        return len(encode_conversation(self.tok(), msgs)[0])

    def estimate(self, msgs: list[dict]) -> int:
        return math.ceil(text_bytes(msgs) / self.bytes_per_token) + self.fixed_tokens(msgs)

    def fixed_tokens(self, msgs: list[dict]) -> int:
        """Template tokens around the text: per turn, plus the default system prompt if none is given."""
        return self.turn_overhead * len(msgs) + (0 if msgs[0]["role"] == "system" else self.conversation_overhead)

    def __call__(self, msgs: list[dict]) -> int:
        return self.exact(msgs) if self.mode == "exact" else self.estimate(msgs)

    def calibrate(self, samples: list[list[dict]]) -> None:
        """Fit bytes-per-token and the fixed overheads on exact counts (least squares, 2 params)."""
        if not samples:
            return
        tok = self.tok()
        sys_len = len(encode_conversation(tok, [{"role": "assistant", "content": ""}])[0])
        one_turn = len(
            encode_conversation(tok, [{"role": "system", "content": ""}, {"role": "assistant", "content": ""}])[0]
        )
        self.turn_overhead = max(1, one_turn // 2)
        self.conversation_overhead = max(0, sys_len - self.turn_overhead)
        x, y = [], []
        # conversation_lengths: the counts exact() gives, in one batch, and a huge record counted in
        # pieces (a whole-text encode of a huge turn holds every token's offsets and strings at once)
        for msgs, n in zip(samples, conversation_lengths(tok, samples)):
            x.append(text_bytes(msgs))
            y.append(max(1, n - self.fixed_tokens(msgs)))
        self.bytes_per_token = max(1.0, float(sum(x)) / float(sum(y)))

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "tokenizer": self.tokenizer,
            "bytes_per_token": self.bytes_per_token,
            "turn_overhead": self.turn_overhead,
            "conversation_overhead": self.conversation_overhead,
        }
