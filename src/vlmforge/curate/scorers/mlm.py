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

Two protocols (``curate.score.mlm_protocol``): ``vlmforge`` (above: our paraphrased instructions in the
checkpoint's chat template) and ``mlm_filter``, the published one for the MLM-Filter judges: their
four criteria and prompt template verbatim, LLaVA's qwen_instruct conversation plus the appended
whitespace token, the first 2 greedy tokens read as an integer (``<metric>_parsed``, as Open-Qwen2VL
thresholds them), and ``<metric>_ev`` over the bare numbers 0..100 (P(n) includes that the next token
does not continue the number).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import DynamicCache

from vlmforge.arch.tokens import IM_END, IMAGE_TOKEN
from vlmforge.config.curate import ScoreConfig
from vlmforge.dist import resolve_device
from vlmforge.errors import UserError
from vlmforge.images import preprocess_batch, tile_images
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


# -- The published MLM-Filter protocol (curate.score.mlm_protocol=mlm_filter) ---------------------------
# Copied verbatim from github.com/Victorwz/MLM_Filter, mlm_filter_scoring_datacomp_batch_inference_v2.py
# at commit 7c4cd80fc1628278dcf09535b87269352c811961: the script for the Llama-3 / Qwen2.5 judges
# (mlm-filter-qwen2.5-1.5b-gpt4o), run by its run_inference.sh and pointed to by Open-Qwen2VL's
# docs/DATA_Filter.md for scoring DataComp. (mlm_filter_scoring_single_image.py differs only in the
# template: "round to multiples of 10.  Please" instead of "multiples of 5 or 10. Please".)
LLAVA_INSTRUCTION_TEMPLATE = """Text Caption: {caption}

{criteria} A higher score indicates higher level of {aspect}. Ensure that your scoring is nuanced and uses the entire range from 0 to 100, reflecting the subtle differences. The score should be given as an integer, with each number between 0 and 100 considered as a potential score, avoiding the tendency to round to multiples of 5 or 10. Please first output a single line containing the value indicating the scores. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias."""

criteria_image_text_matching = "Please evaluate if the provided text caption accurately represents the main features and objects of the image. The caption doesn't need to detail every aspect of the image, but it should capture its primary theme. Rate the overall quality of the text caption's match to the image on a scale of 1-100, considering the criteria mentioned."

criteria_object_detail_fulfillment = "Please evaluate the text caption to determine if it provides detailed descriptions of objects that align with the image. Specifically, assess if the caption sufficiently describes the color, size, position, shape, material, etc., of the objects. Afterward, rate the caption's overall accuracy in capturing object details from the image on a scale of 1-100, based on the criteria provided."

criteria_caption_text_quality = "Please evaluate the text caption based on the following criteria: Grammatical Correctness, Diversity of Vocabulary (e.g., the range and uniqueness of words used), Fluency (e.g., smoothness and natural flow of sentences), Readability, Length, and Structure. Assign an overall quality score on a scale of 1-100."

criteria_semantic_understanding = """Evaluate the given text caption in relation to its corresponding image. Your goal is to determine if the text caption provides additional semantic information that isn't readily apparent just from the image itself.

For example:

1. If the image mentions "a man" but the caption elaborates he is a "homeless man" or a "businessman," then the caption is enriching the semantic context.
2. If the caption introduces concepts like the mathematical tangent function, which require in-depth knowledge to deduce, it is imparting external semantics.
3. Captions revealing specific location addresses, festival details, or other nuanced data not easy to infer from the image also provide external semantic information.
4. Directly identifying specific entities in the image such as buildings, people, bird species, animal breeds, car models, engines, etc., in the caption introduces additional insights.
5. Should the image act as a contextual backdrop and the caption describes elements not explicitly showcased in the image, it has semantic depth.
6. Lastly, if the caption depicts relationships between the subjects in the image, which need commonsense knowledge to understand, it should be considered semantically rich.

Please assess and determine the extent of semantic enrichment the caption provides over the image. Rate the text caption's semantic depth on a scale from 1 to 100."""

MLM_FILTER_CRITERIA = {
    "image_text_matching": criteria_image_text_matching,
    "object_detail_fulfillment": criteria_object_detail_fulfillment,
    "caption_text_quality": criteria_caption_text_quality,
    "semantic_understanding": criteria_semantic_understanding,
}
# The conversation the judge was trained and run with: LLaVA-Unified's conv_qwen_instruct
# (github.com/Victorwz/LLaVA-Unified, llava/conversation.py at 144bc93d85606c8a155183a9f9ffb2ceb56a98f7;
# scripts/mlm_filter/finetune.sh trains Qwen2.5-1.5B-Instruct with --version qwen_instruct):
# SeparatorStyle.MPT, i.e. system + sep, then role + message + sep per turn, then the bare assistant role.
# Unlike Qwen's own template there is no newline after <|im_end|> and no full stop after the system prompt.
QWEN_INSTRUCT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant"
QWEN_INSTRUCT_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
QWEN_INSTRUCT_SEP = "<|im_end|>"
# The v2 script generates this many tokens greedily (do_sample=False) for a Qwen judge and reads
# them as the score; Qwen tokenizers split numbers into single digits, so that is the first two digits.
MLM_FILTER_SCORE_TOKENS = 2
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


def mlm_filter_prompt(caption: str, metric: str) -> str:
    """The judge's prompt as the v2 script renders it (``format_text``: the template, ``<image>\\n`` in
    front since the published judges have mm_use_im_start_end=False, then ``conv.get_prompt()``)."""
    text = LLAVA_INSTRUCTION_TEMPLATE.format(caption=caption, criteria=MLM_FILTER_CRITERIA[metric],
                                             aspect=metric.replace("_", " "))
    user, assistant = QWEN_INSTRUCT_ROLES
    return (QWEN_INSTRUCT_SYSTEM + QWEN_INSTRUCT_SEP + user + IMAGE_TOKEN + "\n" + text + QWEN_INSTRUCT_SEP
            + assistant)


def mlm_filter_prompt_ids(model, tokenizer, caption: str, metric: str,
                          size: tuple[int, int] | None = None) -> list[int]:
    """LLaVA's ``tokenizer_image_token`` of the prompt (each ``<image>`` expanded to the model's visual
    tokens, by its layout: ``size`` is the image's (width, height), needed when the model tiles), then
    the whitespace token the v2 script appends to every prompt ("directly add 220 whitespace to
    decrease the decoding cost for it")."""
    chunks = [tokenizer(c)["input_ids"] for c in mlm_filter_prompt(caption, metric).split(IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    offset = 1 if bos is not None and chunks[0] and chunks[0][0] == bos else 0
    ids = list(chunks[0][:offset])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(model.image_token_id)
        ids += chunk[offset:]
    layout = model.image_layout(tokenizer)
    if size is None and layout.tiling is not None:
        raise ValueError("the judge tiles images (model.images.tiles): its prompt needs the image's size")
    sizes = [size or (1, 1)] * (len(chunks) - 1)  # untiled: one tile per image whatever its size
    return layout.expand(ids, model.image_token_id, sizes).tolist() + [tokenizer(" ")["input_ids"][-1]]


def parse_mlm_filter_score(text: str) -> float | None:
    """Open-Qwen2VL's reading of an answer (``above_threshold_decision`` in
    data_filtering/baselines/apply_filter.py, github.com/Victorwz/Open-Qwen2VL at
    0d76f9f787b819fad81e821da1def24ac3aac8bc): the first line, "," and ";" stripped from its ends,
    as an integer; anything else is None (Open-Qwen2VL drops such a sample)."""
    text = (text or "").split("\n")[0].strip(",").strip(";")
    try:
        return float(int(text))
    except ValueError:
        return None


def number_ids(tokenizer) -> list[list[int]]:
    """Token ids of each answer "0".."100" on its own (the MLM-Filter judge goes on with a new line)."""
    return [tokenizer.encode(str(n), add_special_tokens=False) for n in SCORE_VALUES]


def digit_start_mask(tokenizer) -> torch.Tensor:
    """[len(tokenizer)] True for tokens whose text starts with a digit, i.e. that would make the
    number longer; P(answer's number is n) = P(n's tokens) * P(next token is not one of these)."""
    toks = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([bool(t) and t[0] in "0123456789" for t in toks], dtype=torch.bool)


def _end_logprob(logp: torch.Tensor, number_end: torch.Tensor) -> torch.Tensor:
    """log P(next token does not continue the number) from log-probs [..., V]."""
    cont = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device)
    n = min(len(number_end), logp.shape[-1])
    cont[:n] = number_end[:n].to(logp.device)
    return torch.logsumexp(logp.masked_fill(cont, float("-inf")), -1)


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
def expected_scores(model, prompt: list[int], pixel_values: torch.Tensor, cands: list[list[int]],
                    number_end: torch.Tensor | None = None) -> tuple[float, float]:
    """(expected value, probability mass on the candidates) for one prompt with one image.

    The prompt runs once into a KV cache, which is repeated for the candidates; each candidate then
    costs only its own few tokens. Candidates end with the end-of-turn token (``candidate_ids``), or,
    with ``number_end`` (``digit_start_mask``), are bare numbers (``number_ids``) whose probability
    includes that the next token does not continue the number."""
    dev = pixel_values.device
    n = len(cands)
    ids = torch.tensor([prompt], device=dev)
    seq = torch.zeros_like(ids)
    embeds = model.embed(ids, pixel_values, seq)
    pos = model.position_ids_for(ids, seq)  # eval mode: the configured V2PE delta, if any
    lm, head = model.llm.model, model.llm.get_output_embeddings()
    cache = DynamicCache(config=model.llm.config)
    out = lm(inputs_embeds=embeds, attention_mask=attn.additive_mask(seq, "causal", embeds.dtype),
             position_ids=pos, use_cache=True, **decoding.cache_kwargs(lm, cache))
    first = torch.log_softmax(head(out.last_hidden_state[:, -1]).float(), -1)  # [1, V]
    cand_ids, lens = _candidate_batch(cands)
    k = cand_ids.shape[1]
    fed = k - 1 if number_end is None else k  # an end-of-turn token predicts nothing; a number's last digit does
    cache.batch_repeat_interleave(n)
    c_emb = model.llm.get_input_embeddings()(cand_ids[:, :fed].to(dev))
    p = len(prompt)
    mask = attn.key_padding_mask(torch.ones(n, p + fed, dtype=torch.bool, device=dev), fed, c_emb.dtype,
                                 causal_offset=p)
    c_pos = pos[:, -1:] + 1 + torch.arange(fed, device=dev)[None]  # text after the prompt: +1 per token
    out = lm(inputs_embeds=c_emb, attention_mask=mask, position_ids=c_pos.expand(n, -1),
             use_cache=True, **decoding.cache_kwargs(lm, cache))
    rest = torch.log_softmax(head(out.last_hidden_state).float(), -1)  # [n, fed, V]
    logp = torch.cat([first.expand(n, -1)[:, None], rest], 1)
    total = _sum_logprobs(logp[:, :k], cand_ids, lens)
    if number_end is not None:
        total = total + _end_logprob(logp, number_end).gather(1, lens.to(dev)[:, None]).squeeze(1)
    return _ev_from_logprobs(total)


@torch.no_grad()
def expected_scores_reference(model, prompt: list[int], pixel_values: torch.Tensor,
                              cands: list[list[int]], number_end: torch.Tensor | None = None) -> tuple[float, float]:
    """Same quantity, one full forward per candidate (no cache, no padding): the test's reference."""
    totals = []
    for c in cands:
        ids = torch.tensor([prompt + c], device=pixel_values.device)
        logp = torch.log_softmax(model(ids, pixel_values=pixel_values).float(), -1)[0]
        total = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(c))
        if number_end is not None:
            total += float(_end_logprob(logp[len(prompt) - 1 + len(c)], number_end))
        totals.append(total)
    return _ev_from_logprobs(torch.tensor(totals))


class MLMJudgeScorer:
    names = ("mlm",)

    @classmethod
    def from_config(cls, name: str, score_cfg: ScoreConfig) -> MLMJudgeScorer:
        return cls(score_cfg.model, device=score_cfg.device, metrics=list(score_cfg.mlm_metrics),
                   max_new_tokens=score_cfg.mlm_max_new_tokens, score_from=score_cfg.mlm_score,
                   protocol=score_cfg.mlm_protocol)

    def __init__(self, ckpt: str, device: str = "auto", metrics: list[str] | None = None,
                 max_new_tokens: int = 8, score_from: str = "ev", model=None, tokenizer=None,
                 protocol: str = "vlmforge"):
        self.name = "mlm"
        self.model_path = ckpt
        self.metrics = list(metrics or METRIC_PROMPTS)
        bad = [m for m in self.metrics if m not in METRIC_PROMPTS]
        if bad:
            raise UserError(f"unknown MLM-Filter metric(s) {bad}; choose from {', '.join(METRIC_PROMPTS)}")
        self.protocol = protocol
        self.score_from = score_from
        self.max_new_tokens = max_new_tokens
        self.device = resolve_device(device)
        if model is None:
            model, tokenizer, _ = load_vlm(ckpt, device=self.device)
        self.model, self.tokenizer = model.eval(), tokenizer
        if protocol == "mlm_filter":
            self.cands, self.number_end = number_ids(tokenizer), digit_start_mask(tokenizer)
        else:
            self.cands, self.number_end = candidate_ids(tokenizer), None

    def info(self) -> dict:
        out = {"scorer": "mlm", "model": self.model_path, "metrics": self.metrics, "score": f"mean of {self.score_from}",
               "ev": "expectation over answers 0..100 (exact chain-rule probabilities)"}
        if self.protocol != "vlmforge":  # (the default adds no key: folders scored before still resume)
            out["protocol"] = f"{self.protocol}: first {MLM_FILTER_SCORE_TOKENS} greedy tokens as the score"
        return out

    def _greedy_rows(self, rows: list[list[int]], pixel_values: torch.Tensor, max_new_tokens: int) -> list[str]:
        """Greedy answers to prompts given as token ids (left-padded into one batch, padding masked)."""
        pad = int(self.tokenizer.pad_token_id)
        ids, valid = decoding.left_padded(rows, pad)
        stops = set(decoding.end_of_turn_ids(self.tokenizer))
        new = decoding.generate_ids(self.model, ids.to(self.device), valid.to(self.device), pixel_values, stops, pad,
                                    max_new_tokens=max_new_tokens, temperature=0.0)
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in new]

    def prepare(self, images: list, captions: list[str]) -> dict:
        return {"images": list(images), "captions": list(captions)}

    @torch.no_grad()
    def score(self, batch: dict) -> dict:
        images, captions = batch["images"], batch["captions"]
        n = len(captions)
        cols: dict[str, list] = {}
        layout = self.model.image_layout(self.tokenizer)
        tiles = [tile_images([im], layout) for im in images]  # each image's tower inputs (itself, untiled)
        ends = np.cumsum([len(t) for t in tiles]).tolist()
        pv = preprocess_batch([t for ts in tiles for t in ts], self.model.preprocess_spec()).to(self.device)
        for m in self.metrics:
            if self.protocol == "mlm_filter":
                rows = [mlm_filter_prompt_ids(self.model, self.tokenizer, c, m, im.size) for c, im in zip(captions, images)]
                answers = self._greedy_rows(rows, pv, MLM_FILTER_SCORE_TOKENS)
                parsed = [parse_mlm_filter_score(a) for a in answers]
            else:
                prompts = [judge_messages(c, m) for c in captions]
                answers = decoding.generate(self.model, self.tokenizer, prompts, [[im] for im in images],
                                   max_new_tokens=self.max_new_tokens, temperature=0.0)
                parsed = [parse_score(a) for a in answers]
            evs, masses = [], []
            for i in range(n):
                if self.protocol == "mlm_filter":
                    ids = rows[i]
                else:
                    ids = decoding.prompt_ids(self.model, self.tokenizer, prompts[i], [images[i]], i)
                ev, mass = expected_scores(self.model, ids, pv[ends[i] - len(tiles[i]) : ends[i]], self.cands,
                                           self.number_end)
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
