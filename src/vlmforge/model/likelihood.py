"""Log-likelihood of answer continuations after a chat prompt (multiple choice by likelihood).

SEED-Bench's official protocol and lm-evaluation-harness's ``multiple_choice`` tasks rank the
candidate answers by the model's likelihood instead of parsing generated text, so a model that
never learned to answer with an option letter (a base model, or our tiny from-scratch demo LM) is
still measured on what it knows. Each candidate is scored as the assistant's whole answer:
its tokens plus the end-of-turn token, so a candidate that is a prefix of another ("red" vs
"red square") gets no free advantage. With ``any_first_case`` a candidate's score is the
probability of it with its first letter in either case (log-sum-exp of "blue" and "Blue"): the
case is not part of the answer (VQA scoring lowercases too), but short answers are capitalised in
LLaVA-style training data, so scoring only the lowercase form would measure style, not knowledge.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vlmforge.arch.tokens import IM_END
from vlmforge.images import preprocess_batch, tile_images
from vlmforge.model.decoding import prompt_ids


@torch.no_grad()
def continuation_logprobs(
    model, tokenizer, prompts: list[list[dict]], images: list[list], candidates: Sequence[Sequence[str]],
    any_first_case: bool = True,
) -> list[list[float]]:
    """Summed log-probability of each candidate answer after each prompt (generation prompt added).

    ``candidates[i]`` are the answers to score for prompt i; the prompt's images (their tiles, for a
    tiling model) are encoded once per candidate row (rows are right-padded into one batch).
    """
    if not (len(prompts) == len(images) == len(candidates)):
        raise ValueError(f"{len(prompts)} prompts, {len(images)} image lists, {len(candidates)} candidate lists")
    if any_first_case:
        variants = [[sorted({c, c[:1].lower() + c[1:], c[:1].upper() + c[1:]}) for c in cands] for cands in candidates]
        flat = continuation_logprobs(model, tokenizer, prompts, images,
                                     [[v for vs in per for v in vs] for per in variants], any_first_case=False)
        out = []
        for per, scores in zip(variants, flat):
            k, row = 0, []
            for vs in per:
                row.append(float(torch.logsumexp(torch.tensor(scores[k : k + len(vs)]), 0)))
                k += len(vs)
            out.append(row)
        return out
    end = tokenizer.convert_tokens_to_ids(IM_END)
    layout = model.image_layout(tokenizer)
    rows, spans, row_images = [], [], []
    for i, (messages, ims, cands) in enumerate(zip(prompts, images, candidates)):
        head = prompt_ids(model, tokenizer, messages, ims, i)
        tiles = tile_images(list(ims), layout)
        for c in cands:
            tail = tokenizer(c, add_special_tokens=False)["input_ids"] + [end]
            rows.append(head + tail)
            spans.append((len(head), len(head) + len(tail)))
            row_images.extend(tiles)
    if not rows:
        return [[] for _ in prompts]
    scores = [lp for lp, _ in _span_logprobs(model, tokenizer, rows, spans, row_images)]
    out, k = [], 0
    for cands in candidates:
        out.append(scores[k : k + len(cands)])
        k += len(cands)
    return out


@torch.no_grad()
def answer_logprobs(
    model, tokenizer, prompts: list[list[dict]], images: list[list], answers: Sequence[str],
    end_of_turn: bool = False,
) -> list[tuple[float, bool]]:
    """(log P(answer | prompt), whether greedy decoding would produce it) for one answer per prompt.

    The answer's tokens follow the generation prompt; with ``end_of_turn`` the closing ``<|im_end|>``
    counts too (as in :func:`continuation_logprobs`). This is lm-eval's ``loglikelihood`` request.
    """
    if not (len(prompts) == len(images) == len(answers)):
        raise ValueError(f"{len(prompts)} prompts, {len(images)} image lists, {len(answers)} answers")
    if not prompts:
        return []
    end = [tokenizer.convert_tokens_to_ids(IM_END)] if end_of_turn else []
    layout = model.image_layout(tokenizer)
    rows, spans, row_images = [], [], []
    for i, (messages, ims, answer) in enumerate(zip(prompts, images, answers)):
        head = prompt_ids(model, tokenizer, messages, ims, i)
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + end
        if not tail:
            raise ValueError(f"prompt {i}: the answer {answer!r} has no tokens")
        rows.append(head + tail)
        spans.append((len(head), len(head) + len(tail)))
        row_images.extend(tile_images(list(ims), layout))
    return _span_logprobs(model, tokenizer, rows, spans, row_images)


def _span_logprobs(model, tokenizer, rows: list[list[int]], spans: list[tuple[int, int]],
                   row_images: list) -> list[tuple[float, bool]]:
    """Per row: summed log-prob of tokens [a, b) given the ones before, and whether each is the argmax.
    ``row_images``: the tower inputs (images or their tiles) of every row, in order."""
    dev = next(model.parameters()).device
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), int(tokenizer.pad_token_id), dtype=torch.long)
    seq_ids = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        seq_ids[r, : len(row)] = 0
    ids, seq_ids = ids.to(dev), seq_ids.to(dev)
    pv = preprocess_batch(row_images, model.preprocess_spec()).to(dev) if row_images else None
    was_training = model.training
    model.eval()
    try:
        hidden = model(ids, pv, seq_ids=seq_ids, output="hidden")
    finally:
        model.train(was_training)
    # Vocabulary logits only where an answer token is predicted: [rows, width, vocab] would not fit
    # in memory for a real LM (151k-token vocabulary).
    head = model.llm.get_output_embeddings()
    scores = []
    for r, (a, b) in enumerate(spans):
        logp = torch.log_softmax(head(hidden[r, a - 1 : b - 1]).float(), dim=-1)
        pick = logp.clone()
        pick[:, model.image_token_id] = float("-inf")  # generation never emits the placeholder
        greedy = bool((pick.argmax(-1) == ids[r, a:b]).all())
        scores.append((float(logp.gather(-1, ids[r, a:b, None]).sum()), greedy))
    return scores
