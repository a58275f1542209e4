"""Position ids over a packed row: restart per sample, continue over the row, or V2PE.

V2PE (Variable Visual Position Encoding): text tokens advance the position by 1, visual tokens by
delta < 1, so long image sequences use little of the rotary range. In training delta is drawn per
image from {1, 1/2, ..., 1/max_denominator}; at inference it is fixed. Positions are floats and
reach the rotary embedding as such (Qwen2RotaryEmbedding does `position_ids.float()`).
"""

from __future__ import annotations

import math

import torch


def sample_starts(seq_ids: torch.Tensor) -> torch.Tensor:
    """True where a packed sample (or the padding run) begins."""
    start = torch.ones_like(seq_ids, dtype=torch.bool)
    start[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    return start


def positions_from_increments(inc: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Position of token t = sum of the increments of the earlier tokens of its sample (0 at each start)."""
    inc = inc.to(torch.float64)  # dyadic fractions stay exact
    excl = torch.cumsum(inc, dim=1) - inc
    idx = torch.arange(seq_ids.shape[1], device=seq_ids.device).expand_as(seq_ids)
    first = torch.where(sample_starts(seq_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    pos = excl - excl.gather(1, first)
    return pos.masked_fill(seq_ids < 0, 0.0)


def restart_positions(seq_ids: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... restarting at each packed sample; 0 on padding (LongTensor)."""
    return positions_from_increments(torch.ones_like(seq_ids, dtype=torch.float64), seq_ids).long()


def draw_v2pe_deltas(n_images: int, max_denominator: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """One delta per image, uniform over {1, 1/2, 1/4, ..., 1/max_denominator}."""
    k = int(math.log2(max_denominator))
    exps = torch.randint(0, k + 1, (n_images,), generator=generator)
    return torch.pow(2.0, -exps.to(torch.float64))


def v2pe_positions(
    input_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    image_token_id: int,
    tokens_per_image: int,
    deltas: torch.Tensor | float,
) -> torch.Tensor:
    """Float positions: text +1, each visual token +delta of its image (images in row-major order)."""
    is_img = input_ids == image_token_id
    if isinstance(deltas, (int, float)):
        per_token = torch.full(input_ids.shape, float(deltas), dtype=torch.float64, device=input_ids.device)
    else:
        flat = is_img.flatten().long()
        img_idx = ((torch.cumsum(flat, 0) - 1).clamp(min=0) // tokens_per_image).view_as(input_ids)
        deltas = deltas.to(device=input_ids.device, dtype=torch.float64)
        per_token = deltas[img_idx.clamp(max=max(len(deltas) - 1, 0))] if len(deltas) else torch.ones_like(
            input_ids, dtype=torch.float64
        )
    inc = torch.where(is_img, per_token, torch.ones_like(per_token))
    return positions_from_increments(inc, seq_ids).to(torch.float32)
