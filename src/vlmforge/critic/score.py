"""Step scores of a process reward model (VisualPRM): P('+') against P('-') at every step's
assistant turn, all steps of a solution in one forward pass.

A request is the critic's conversation (:func:`vlmforge.critic.steps.critic_messages`) with '+' as
every placeholder reply. Because attention is causal, the score at step i sees only the question
and steps 1..i (and the placeholders before it), so it equals the score of the conversation cut
after step i. The rows are built as training builds them (``conversation_sample`` with the
verdict mask, ``collate_packs``): the positions read here are the positions stage ``prm`` trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from vlmforge.critic.steps import critic_messages
from vlmforge.data.collate import IGNORE_INDEX, collate_packs
from vlmforge.data.sft.samples import conversation_sample
from vlmforge.data.sft.verdicts import end_of_turn_ids, verdict_ids
from vlmforge.images import preprocess_batch, tile_images

AGGREGATES = ("mean", "min", "last", "product")
__all__ = ["AGGREGATES", "StepRequest", "aggregate", "step_scores", "verdict_ids"]  # verdict_ids: (id of '+', id of '-'), UserError if not single tokens


@dataclass
class StepRequest:
    """One solution to score: the question the policy was asked (no image markers), its images
    (decoded ``PIL.Image``), and its steps."""

    question: str
    images: list = field(default_factory=list)
    steps: list[str] = field(default_factory=list)


def aggregate(scores: Sequence[float], rule: str = "mean") -> float:
    """A solution's score from its step scores: ``mean`` (VisualPRM), ``min`` (the weakest step),
    ``last`` (the final step), ``product`` (every step right); no steps -> 0.0."""
    if rule not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {rule!r}")
    if not scores:
        return 0.0
    if rule == "mean":
        return float(sum(scores) / len(scores))
    if rule == "min":
        return float(min(scores))
    if rule == "last":
        return float(scores[-1])
    return float(math.prod(scores))


def _sample(model, tokenizer, request: StepRequest, verdicts: tuple[int, int], end_ids: set[int], spec: dict,
            layout) -> dict:
    messages = critic_messages(request.question, request.steps, None, n_images=len(request.images))
    # Markers stay one id here; the layout expands them (tiles x tokens per tile, wrap), as training does.
    ids, labels, n_img = conversation_sample(tokenizer, messages, image_id=model.image_token_id,
                                             visual_tokens=1, verdicts=verdicts, end_ids=end_ids)
    if n_img != len(request.images):
        raise ValueError(f"the question holds image markers: {n_img} in the conversation for {len(request.images)} image(s)")
    ids, labels = layout.expand(ids, model.image_token_id, [im.size for im in request.images], labels)
    tiles = tile_images(list(request.images), layout)
    pixels = preprocess_batch(tiles, spec) if tiles else None
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


@torch.no_grad()
def step_scores(model, tokenizer, requests: Sequence[StepRequest], batch_size: int = 8) -> list[list[float]]:
    """P('+') / (P('+') + P('-')) at each step of each request, one forward pass per batch of
    ``batch_size`` requests (rows right-padded); a request without steps gets []."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    verdicts = verdict_ids(tokenizer)
    end_ids = end_of_turn_ids(tokenizer)
    spec = model.preprocess_spec()
    layout = model.image_layout(tokenizer)
    dev = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in requests]
    todo = [i for i, r in enumerate(requests) if r.steps]
    was_training = model.training
    model.eval()
    try:
        for a in range(0, len(todo), batch_size):
            chunk = todo[a : a + batch_size]
            samples = [_sample(model, tokenizer, requests[i], verdicts, end_ids, spec, layout) for i in chunk]
            batch = collate_packs([[s] for s in samples], int(tokenizer.pad_token_id))
            batch = {k: v.to(dev) for k, v in batch.items()}
            targets = batch["labels"][:, 1:]
            rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major: steps in order
            pred = rows * batch["input_ids"].shape[1] + cols
            n = int(pred.numel())
            plus = torch.full((n,), verdicts[0], dtype=torch.long, device=dev)
            minus = torch.full((n,), verdicts[1], dtype=torch.long, device=dev)
            logp = model(batch["input_ids"], batch.get("pixel_values"), position_ids=batch["position_ids"],
                         seq_ids=batch["seq_ids"], output="target_logprobs", pred_index=torch.cat([pred, pred]),
                         target_ids=torch.cat([plus, minus]))
            # P(+) / (P(+) + P(-)) = sigmoid(log P(+) - log P(-))
            p = torch.sigmoid(logp[:n].float() - logp[n:].float()).cpu().tolist()
            per_row = torch.bincount(rows.cpu(), minlength=len(chunk)).tolist()
            at = 0
            for i, k in zip(chunk, per_row):
                if k != len(requests[i].steps):
                    raise RuntimeError(f"request {i}: {k} verdict positions for {len(requests[i].steps)} steps")
                out[i] = p[at : at + k]
                at += k
    finally:
        model.train(was_training)
    return out
