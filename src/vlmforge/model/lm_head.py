"""Log-probabilities of chosen target tokens from final hidden states, through the LM head.

Every training objective needs only log p(target) at some positions (next-token CE is its
negative; MPO sums it over responses; the PRM reads '+' / '-'), so the head is applied only to the
selected hidden states, never to the whole [B, L, V] grid.
"""

from __future__ import annotations

import torch
from torch import nn


def token_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """``log softmax(head(hidden))[t, targets[t]]`` as fp32 [T] for hidden [T, D], targets [T]."""
    logits = head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
