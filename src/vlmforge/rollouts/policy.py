"""The policy ``prm-data`` samples from: a vlmforge model behind ``montecarlo.Policy``."""

from __future__ import annotations

from vlmforge.model.decoding import generate


class ModelPolicy:
    """Temperature / top-p sampling with a KV cache; each row's seed is its own (``generate``'s
    per-prompt generators), and a row with a prefix continues that partial reply. Every
    generation, fresh or continued, gets ``max_new_tokens`` new tokens."""

    def __init__(self, model, tokenizer, *, temperature: float, top_p: float, max_new_tokens: int):
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    def __call__(self, prompts, images, prefixes, seeds):
        return generate(self.model, self.tokenizer, prompts, images, max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature, top_p=self.top_p, seed=list(seeds),
                        reply_prefixes=list(prefixes))
