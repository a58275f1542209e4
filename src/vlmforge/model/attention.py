"""Attention masks over packed rows.

`causal`: every token sees all earlier tokens of its row (Open-Qwen2VL: pseudo-interleaved
in-context learning across packed samples). `document`: a token sees only earlier tokens of its
own sample (block-diagonal causal). We always build an explicit additive float mask (0 / finfo.min):
a boolean 4D mask is silently wrong with eager attention, and no mask at all lets transformers
guess packed sequences from position_ids (wrong for V2PE's fractional positions).
Padding (seq_id -1) sees only itself so that no softmax row is empty (no NaN).

Preference pairs in the shared-prompt layout ([prompt][chosen][rejected] in one row) add
``branch_ids`` (0 prompt, 1 chosen, 2 rejected): a query sees keys of its own branch and of the
prompt, never the other response, so the prompt is computed once for both.
"""

from __future__ import annotations

import importlib.util

import torch

MODES = ("causal", "document")


def allowed(seq_ids: torch.Tensor, mode: str, branch_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, L, L]: may query i attend to key j."""
    if mode not in MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {', '.join(MODES)}")
    b, n = seq_ids.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=seq_ids.device).tril()
    real_k = (seq_ids >= 0)[:, None, :]
    ok = causal[None] & real_k
    if mode == "document":
        ok = ok & (seq_ids[:, :, None] == seq_ids[:, None, :])
    if branch_ids is not None:
        k_branch = branch_ids[:, None, :]
        ok = ok & ((k_branch == 0) | (k_branch == branch_ids[:, :, None]))
        if mode != "document":  # pairs packed in one row never see each other, in either mode
            ok = ok & (seq_ids[:, :, None] == seq_ids[:, None, :])
    pad_q = (seq_ids < 0)[:, :, None]
    eye = torch.eye(n, dtype=torch.bool, device=seq_ids.device)[None]
    return torch.where(pad_q, eye, ok)


def additive_mask(seq_ids: torch.Tensor, mode: str, dtype: torch.dtype, branch_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Float [B, 1, L, L]: 0 where attention is allowed, finfo(dtype).min elsewhere."""
    ok = allowed(seq_ids, mode, branch_ids)
    mask = torch.zeros(ok.shape, dtype=dtype, device=seq_ids.device)
    return mask.masked_fill_(~ok, torch.finfo(dtype).min)[:, None]


def key_padding_mask(key_valid: torch.Tensor, q_len: int, dtype: torch.dtype, causal_offset: int | None = None) -> torch.Tensor:
    """[B, 1, q_len, K] additive mask for generation with a KV cache: keys that are padding are masked;
    with `causal_offset` (the absolute index of the first query) later keys are masked too."""
    b, k = key_valid.shape
    ok = key_valid[:, None, :].expand(b, q_len, k)
    if causal_offset is not None:
        q_idx = torch.arange(q_len, device=key_valid.device)[:, None] + causal_offset
        ok = ok & (torch.arange(k, device=key_valid.device)[None, :] <= q_idx)[None]
    mask = torch.zeros(ok.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill_(~ok, torch.finfo(dtype).min)[:, None]


def flash_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def varlen_kwargs(seq_ids: torch.Tensor, mode: str) -> dict:
    """flash-attn varlen arguments for the batch flattened to one row [1, B*L]:
    one segment per packed sample (document) or per row (causal)."""
    b, n = seq_ids.shape
    if mode == "document":
        flat = seq_ids + (torch.arange(b, device=seq_ids.device)[:, None] * (n + 1))
        flat = flat.flatten()
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        start_idx = torch.nonzero(starts).flatten()
    else:
        start_idx = torch.arange(0, b * n, n, device=seq_ids.device)
    cu = torch.cat([start_idx, torch.tensor([b * n], device=seq_ids.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
