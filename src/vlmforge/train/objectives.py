"""Next-token cross-entropy with InternVL's loss reductions, as a weighted sum.

Each supervised target token t gets a weight w_t; the loss of an optimizer step is
``sum_t w_t * CE_t / W`` where W is the sum of all weights of the step over every micro-batch
and rank. The loop computes W up front (one all-reduce), so each micro-batch contributes
``sum(w * CE) / W`` and the gradient does not depend on how the batch is split.

Reductions (n = supervised tokens of the packed sample the token belongs to):
``token`` w = 1 (every token counts the same), ``sample`` w = 1/n (every sample counts the
same), ``square`` w = 1/sqrt(n) (InternVL's compromise).
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F

from vlmforge.config.train import LossReduction
from vlmforge.data.collate import IGNORE_INDEX

REDUCTIONS = get_args(LossReduction)  # train.loss_reduction's choices


def token_weights(labels: torch.Tensor, seq_ids: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Float weights [B, L-1] for the shifted targets ``labels[:, 1:]`` (0 where unsupervised)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {reduction!r}")
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    if reduction == "token":
        return supervised.float()
    rows, length = targets.shape
    if seq_ids is None:  # unpacked rows: one sample per row
        sample = torch.zeros_like(targets)
    else:
        sample = seq_ids[:, 1:].clamp(min=0)  # the sample a target token belongs to
    per_row = int(sample.max().item()) + 1 if sample.numel() else 1
    key = torch.arange(rows, device=labels.device).unsqueeze(1) * per_row + sample
    counts = torch.zeros(rows * per_row, device=labels.device)
    counts.scatter_add_(0, key[supervised], torch.ones(int(supervised.sum()), device=labels.device))
    n = counts[key].clamp(min=1.0)
    w = 1.0 / n if reduction == "sample" else n.rsqrt()
    return torch.where(supervised, w, torch.zeros_like(w))


def weighted_token_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t * CE_t`` (a scalar, fp32), computed only on positions with a weight.

    ``logits`` [B, L, V] are the model outputs for ``labels`` [B, L] (HF convention: position t
    predicts labels[t+1]); ``weights`` [B, L-1] come from :func:`token_weights`.
    """
    active = weights > 0
    if not bool(active.any()):
        return logits.sum() * 0.0  # keeps the graph (and FSDP's hooks) connected
    pred = logits[:, :-1][active].float()
    target = labels[:, 1:][active]
    ce = F.cross_entropy(pred, target, reduction="none")
    return (ce * weights[active].to(ce.dtype)).sum()
