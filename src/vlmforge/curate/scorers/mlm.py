"""``mlm`` scorer: a vlmforge VLM as an image-text quality judge with MLM-Filter's four metrics.

Per metric (image-text matching, object detail fulfillment, caption text quality, semantic
understanding) the judge sees the image, the caption and an instruction asking for a 0-100 score.

Two scores per metric:

- ``<metric>_parsed``: the first integer 0..100 in the greedy answer (``generate``); an answer with
  no such number is recorded: ``<metric>_parsed`` null, the metric listed in ``unparseable``,
  the raw answer kept in ``<metric>_answer``.
- ``<metric>_ev``: the expected score under the judge's own distribution over the answers
  "0".."100": P(n) = prod_t P(token_t | prompt, earlier tokens) * P(<|im_end|> | prompt, n), exact for
  any tokenizer (Qwen-style tokenizers split numbers into digits, so "85" is two tokens), computed by
  teacher-forcing all 101 candidates in one batch on top of the prompt's KV cache (the prompt, image
  included, runs once; each candidate adds <= 4 tokens). P is renormalised over the 101 candidates;
  the mass they held before renormalising is ``<metric>_mass`` (low mass = the judge is not
  answering with a number).

``score`` (what filters use by default) is the mean over metrics of ``_ev`` (``mlm_score=ev``) or
of ``_parsed`` (``mlm_score=parsed``; null if any metric is unparseable).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import DynamicCache

from vlmforge.arch.tokens import IM_END, IMAGE_TOKEN
from vlmforge.curate.scorers.base import resolve_device
from vlmforge.errors import UserError
from vlmforge.images import preprocess_batch
from vlmforge.model import attention as attn
from vlmforge.model import decoding
from vlmforge.model.saving import load_vlm

# Paraphrases of MLM-Filter's four judging instructions (Wang et al. 2024, "Finetuned Multimodal
# Language Models are High-Quality Image-Text Data Filters").
METRIC_PROMPTS = {
    "image_text_matching": (
        "Judge whether the text caption captures the main subject and objects of the image. It need not "
        "mention every detail, but it must match the image's primary content. Give a score from 0 to 100 "
        "for how well the caption matches the image. Answer with the number only."
    ),
    "object_detail_fulfillment": (
        "Judge whether the text caption describes the objects in the image in detail: their colour, size, "
        "position, count and relations. Give a score from 0 to 100 for how fully the caption covers the "
        "objects' details. Answer with the number only."
    ),
    "caption_text_quality": (
        "Judge the text caption as text: grammar, fluency, vocabulary and how informative it is, regardless "
        "of the image. Give a score from 0 to 100 for the caption's text quality. Answer with the number only."
    ),
    "semantic_understanding": (
        "Judge whether the text caption adds meaning beyond listing objects, such as the scene, actions, or "
        "relations that help understand the image. Give a score from 0 to 100 for the caption's semantic "
        "understanding of the image. Answer with the number only."
    ),
}
SCORE_VALUES = list(range(101))
_NUMBER = re.compile(r"(?<![\d.])(\d{1,3})(?![\d.]?\d)")


def judge_messages(caption: str, metric: str) -> list[dict]:
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\nText Caption: {caption}\n\n{METRIC_PROMPTS[metric]}"}]


def parse_score(text: str) -> float | None:
    """The first integer 0..100 in the answer, else None (unparseable)."""
    for m in _NUMBER.finditer(text or ""):
        v = int(m.group(1))
        if 0 <= v <= 100:
            return float(v)
    return None


def candidate_ids(tokenizer) -> list[list[int]]:
    """Token ids of each answer "0".."100" followed by the end-of-turn token."""
    end = tokenizer.convert_tokens_to_ids(IM_END)
    return [tokenizer.encode(str(n), add_special_tokens=False) + [end] for n in SCORE_VALUES]


def _ev_from_logprobs(total: torch.Tensor) -> tuple[float, float]:
    mass = float(torch.logsumexp(total, 0).exp())
    probs = torch.softmax(total, 0)
    values = torch.arange(len(total), dtype=torch.float32, device=total.device)  # candidate i is the score i
    return float((probs * values).sum()), mass


def _candidate_batch(cands: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded candidate ids [n, k] and their lengths (padding is never attended: causal)."""
    k = max(len(c) for c in cands)
    ids = torch.zeros((len(cands), k), dtype=torch.long)
    for i, c in enumerate(cands):
        ids[i, : len(c)] = torch.tensor(c)
    return ids, torch.tensor([len(c) for c in cands])


def _sum_logprobs(logp: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """logp [n, k, V] predicting ids[:, t] at step t -> summed log-prob of each candidate's own tokens."""
    tok_lp = logp.gather(-1, ids.to(logp.device)[..., None]).squeeze(-1)
    valid = torch.arange(ids.shape[1], device=logp.device)[None] < lens.to(logp.device)[:, None]
    return (tok_lp * valid).sum(-1)


@torch.no_grad()
def expected_scores(model, prompt: list[int], pixel_values: torch.Tensor, cands: list[list[int]]) -> tuple[float, float]:
    """(expected value, probability mass on the candidates) for one prompt with one image.

    The prompt runs once into a KV cache, which is repeated for the candidates; each candidate then
    costs only its own few tokens."""
    dev = pixel_values.device
    n = len(cands)
    ids = torch.tensor([prompt], device=dev)
    seq = torch.zeros_like(ids)
    embeds = model.embed(ids, pixel_values, seq)
    pos = model.position_ids_for(ids, seq)  # eval mode: the configured V2PE delta, if any
    lm, head = model.llm.model, model.llm.get_output_embeddings()
    cache = DynamicCache(config=model.llm.config)
    out = lm(inputs_embeds=embeds, attention_mask=attn.additive_mask(seq, "causal", embeds.dtype),
             position_ids=pos, past_key_values=cache, use_cache=True)
    first = torch.log_softmax(head(out.last_hidden_state[:, -1]).float(), -1)  # [1, V]
    cand_ids, lens = _candidate_batch(cands)
    k = cand_ids.shape[1]
    cache.batch_repeat_interleave(n)
    c_emb = model.llm.get_input_embeddings()(cand_ids[:, :-1].to(dev))  # the last token predicts nothing
    p = len(prompt)
    mask = attn.key_padding_mask(torch.ones(n, p + k - 1, dtype=torch.bool, device=dev), k - 1, c_emb.dtype,
                                 causal_offset=p)
    c_pos = pos[:, -1:] + 1 + torch.arange(k - 1, device=dev)[None]  # text after the prompt: +1 per token
    out = lm(inputs_embeds=c_emb, attention_mask=mask, position_ids=c_pos.expand(n, -1),
             past_key_values=cache, use_cache=True)
    rest = torch.log_softmax(head(out.last_hidden_state).float(), -1)  # [n, k-1, V]
    logp = torch.cat([first.expand(n, -1)[:, None], rest], 1)
    return _ev_from_logprobs(_sum_logprobs(logp, cand_ids, lens))


@torch.no_grad()
def expected_scores_reference(model, prompt: list[int], pixel_values: torch.Tensor,
                              cands: list[list[int]]) -> tuple[float, float]:
    """Same quantity, one full forward per candidate (no cache, no padding): the test's reference."""
    totals = []
    for c in cands:
        ids = torch.tensor([prompt + c], device=pixel_values.device)
        logp = torch.log_softmax(model(ids, pixel_values=pixel_values).float(), -1)[0]
        totals.append(sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(c)))
    return _ev_from_logprobs(torch.tensor(totals))


class MLMJudgeScorer:
    names = ("mlm",)

    @classmethod
    def from_config(cls, name: str, score_cfg) -> MLMJudgeScorer:
        return cls(score_cfg.model, device=score_cfg.device, metrics=list(score_cfg.mlm_metrics),
                   max_new_tokens=score_cfg.mlm_max_new_tokens, score_from=score_cfg.mlm_score)

    def __init__(self, ckpt: str, device: str = "auto", metrics: list[str] | None = None,
                 max_new_tokens: int = 8, score_from: str = "ev", model=None, tokenizer=None):
        self.name = "mlm"
        self.model_path = ckpt
        self.metrics = list(metrics or METRIC_PROMPTS)
        bad = [m for m in self.metrics if m not in METRIC_PROMPTS]
        if bad:
            raise UserError(f"unknown MLM-Filter metric(s) {bad}; choose from {', '.join(METRIC_PROMPTS)}")
        self.score_from = score_from
        self.max_new_tokens = max_new_tokens
        self.device = resolve_device(device)
        if model is None:
            model, tokenizer, _ = load_vlm(ckpt, device=self.device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cands = candidate_ids(tokenizer)

    def info(self) -> dict:
        return {"scorer": "mlm", "model": self.model_path, "metrics": self.metrics, "score": f"mean of {self.score_from}",
                "ev": "expectation over answers 0..100 (exact chain-rule probabilities)"}

    def prepare(self, images: list, captions: list[str]) -> dict:
        return {"images": list(images), "captions": list(captions)}

    @torch.no_grad()
    def score(self, batch: dict) -> dict:
        images, captions = batch["images"], batch["captions"]
        n = len(captions)
        cols: dict[str, list] = {}
        pv = preprocess_batch(images, self.model.preprocess_spec()).to(self.device)
        for m in self.metrics:
            prompts = [judge_messages(c, m) for c in captions]
            answers = decoding.generate(self.model, self.tokenizer, prompts, [[im] for im in images],
                               max_new_tokens=self.max_new_tokens, temperature=0.0)
            parsed = [parse_score(a) for a in answers]
            evs, masses = [], []
            for i in range(n):
                ids = decoding.prompt_ids(self.model, self.tokenizer, prompts[i], 1, i)
                ev, mass = expected_scores(self.model, ids, pv[i : i + 1], self.cands)
                evs.append(ev)
                masses.append(mass)
            cols[f"{m}_answer"] = answers
            cols[f"{m}_parsed"] = parsed
            cols[f"{m}_ev"] = evs
            cols[f"{m}_mass"] = masses
        cols["unparseable"] = [",".join(m for m in self.metrics if cols[f"{m}_parsed"][i] is None) for i in range(n)]
        if self.score_from == "ev":
            cols["score"] = list(np.mean([cols[f"{m}_ev"] for m in self.metrics], axis=0))
        else:
            cols["score"] = [
                None if any(cols[f"{m}_parsed"][i] is None for m in self.metrics)
                else float(np.mean([cols[f"{m}_parsed"][i] for m in self.metrics]))
                for i in range(n)
            ]
        return cols
