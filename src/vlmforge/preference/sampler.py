"""What the pair builder asks of a model: N sampled replies to each of a batch of questions, and
continuations of truncated answers without the image. ``ModelSampler`` answers with a vlmforge
model; tests use stubs with known answers.

Every sampled row has its own seed (``generate``'s per-prompt generators): reply j of a question
is drawn with ``row_seed(question seed, j)``, so a question's replies do not depend on which
other questions share its generate call or on the rank it runs on. Continuations are greedy: the
model's most likely words without the image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from vlmforge.model.decoding import end_of_turn_ids, generate, generate_ids, left_padded, prompt_ids
from vlmforge.preference.pairs import Sample


@dataclass(frozen=True)
class SampleRequest:
    """``n`` replies wanted to one chat prompt (``images`` fill its ``<image>`` markers), drawn with ``seed``."""

    messages: list[dict]
    images: list
    n: int
    seed: int


def row_seed(seed: int, index: int) -> int:
    """The seed of reply ``index`` of a question whose seed is ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big") >> 1


class Sampler(Protocol):
    def sample(self, requests: list[SampleRequest]) -> list[list[Sample | str]]:
        """Per request, its ``n`` replies."""

    def continue_answers(self, messages: list[list[dict]], prefixes: list[str], rests: list[str]) -> list[str]:
        """Per row: the assistant turn that starts with ``prefixes[i]`` after the image-free prompt
        ``messages[i]``, continued (about as long as ``rests[i]``, the words the prefix dropped);
        returns prefix + continuation."""


class ModelSampler:
    """``Sampler`` over a vlmforge model: temperature / top-p sampling with a KV cache."""

    def __init__(self, model, tokenizer, *, temperature: float, top_p: float, max_new_tokens: int):
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    def sample(self, requests):
        if not requests:
            return []
        prompts = [r.messages for r in requests for _ in range(r.n)]
        images = [list(r.images) for r in requests for _ in range(r.n)]
        seeds = [row_seed(r.seed, j) for r in requests for j in range(r.n)]
        ids = generate(self.model, self.tokenizer, prompts, images, max_new_tokens=self.max_new_tokens,
                       temperature=self.temperature, top_p=self.top_p, seed=seeds, return_ids=True)
        # A reply as long as the budget may have been cut before its end-of-turn token.
        flat = [Sample(self.tokenizer.decode(t, skip_special_tokens=True), finished=len(t) < self.max_new_tokens)
                for t in ids]
        out, k = [], 0
        for r in requests:
            out.append(flat[k : k + r.n])
            k += r.n
        return out

    def continue_answers(self, messages, prefixes, rests):
        if not messages:
            return []
        tok, model = self.tokenizer, self.model
        heads = [tok(p, add_special_tokens=False)["input_ids"] for p in prefixes]
        # Twice the tokens of the dropped half (at least 16): room to say as much, not to ramble.
        limits = [max(16, 2 * len(tok(r, add_special_tokens=False)["input_ids"])) for r in rests]
        rows = [prompt_ids(model, tok, m, [], i) + h for i, (m, h) in enumerate(zip(messages, heads))]
        ids, valid = left_padded(rows, int(tok.pad_token_id))
        dev = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            new = generate_ids(model, ids.to(dev), valid.to(dev), None, set(end_of_turn_ids(tok)), int(tok.pad_token_id),
                               max_new_tokens=max(limits), temperature=0.0)
        finally:
            model.train(was_training)
        # Each row's own limit, so a continuation does not depend on its batch's longest limit.
        return [tok.decode(h + t[:limit], skip_special_tokens=True) for h, t, limit in zip(heads, new, limits)]
