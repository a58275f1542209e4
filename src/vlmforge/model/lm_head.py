"""Log-probabilities of chosen target tokens from final hidden states, through the LM head.

Every training objective needs only log p(target) at some positions (next-token CE is its
negative; MPO sums it over responses; the PRM reads '+' / '-'), so the head is applied only to the
selected hidden states, never to the whole [B, L, V] grid.

Three ways to compute it, one result (fp32 [T]):

- ``chunk_tokens == 0``: the head on all T hidden states at once, then log-softmax (holds [T, V]
  logits, their log-softmax and, in backward, their gradient).
- ``chunk_tokens > 0``: :class:`ChunkedTargetLogprobs`, a custom autograd function. Forward keeps
  only the log-sum-exp per token; backward recomputes each chunk's logits and turns them into the
  chunk's gradients for the hidden states, the head weight (the embedding matrix when tied) and
  its bias. At most one chunk of [chunk_tokens, V] lives at a time, in forward and in backward.
  The price is one more head matmul (the recompute).
- ``fused`` "liger" / "cce": a maintained fused linear-cross-entropy GPU kernel (the liger_kernel or
  cut_cross_entropy extra); they return CE per token, and log p = -CE. Both are checked once per
  process against the chunked path with uneven per-token gradients (MPO weights tokens unevenly,
  and some kernel versions scale gradients as if the loss were a plain sum).

The model calls this inside its forward, so under FSDP2 the head weight is the unsharded tensor
and its gradient is reduce-scattered by FSDP as usual.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from vlmforge.errors import UserError

FUSED_KINDS = ("off", "liger", "cce")
# the import name and the pip package of each fused kernel
FUSED_PACKAGES = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}
_FUSED_VERIFIED: set[tuple[str, str]] = set()  # (kind, device type) checked against the chunked path


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else what F.linear would give."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _head_weight_bias(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"the LM head {type(head).__name__} has no [vocab, hidden] weight; "
                        "chunked and fused losses need a linear head")
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """fp32 [n, V] logits of one chunk; h, w, b already in the compute dtype."""
    return F.linear(h, w, b).float()


class ChunkedTargetLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[t, targets[t]]`` in chunks of tokens, recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int, dtype: torch.dtype):
        n_tokens = hidden.shape[0]
        out = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_tokens, chunk_tokens):
                end = min(start + chunk_tokens, n_tokens)
                logits = _chunk_logits(hidden[start:end].to(dtype), w, b)
                picked = logits.gather(-1, targets[start:end, None]).squeeze(-1)
                # log-sum-exp in place (torch.logsumexp would allocate another [chunk, V])
                top = logits.amax(dim=-1)
                total = logits.sub_(top[:, None]).exp_().sum(dim=-1)
                lse[start:end] = top + total.log()
                out[start:end] = picked - lse[start:end]
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_tokens, ctx.dtype = chunk_tokens, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk_tokens, dtype = ctx.chunk_tokens, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_out = grad_out.float()
        n_tokens = hidden.shape[0]
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        # the weight's own dtype: a bf16 weight (FSDP2's unsharded bf16 parameter) accumulates in bf16 via
        # addmm (fp32 inside each matmul, one rounding per chunk) rather than a second fp32 [V, D] copy
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_tokens, chunk_tokens):
                end = min(start + chunk_tokens, n_tokens)
                h = hidden[start:end].to(dtype)
                g = grad_out[start:end]
                # d log p_t / d logits = onehot(t) - softmax, scaled by each token's upstream gradient
                dz = _chunk_logits(h, w, b)
                dz.sub_(lse[start:end, None]).exp_().mul_(-g[:, None])
                dz.scatter_add_(-1, targets[start:end, None], g[:, None])
                if grad_b is not None:
                    grad_b += dz.sum(0)
                dz = dz.to(dtype)
                if grad_h is not None:
                    grad_h[start:end] = (dz @ w).to(hidden.dtype)
                if grad_w is not None:
                    if grad_w.dtype == dtype:
                        grad_w.addmm_(dz.t(), h)
                    else:  # an fp32 weight under bf16 autocast
                        grad_w += dz.t() @ h
                del dz
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def full_token_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """The reference path: all [T, V] logits at once."""
    logits = head(hidden).float()
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])
    return picked.squeeze(-1).clone()  # not a view: FSDP2 cannot hook a view returned from forward


def chunked_token_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    weight, bias = _head_weight_bias(head)
    return ChunkedTargetLogprobs.apply(hidden, weight, bias, targets, int(chunk_tokens), compute_dtype(hidden, weight))


def require_fused(kind: str, device: torch.device) -> None:
    """UserError unless ``train.fused_loss=kind`` can run here (the extra installed, a CUDA device)."""
    if kind == "off":
        return
    if kind not in FUSED_PACKAGES:
        raise UserError(f"train.fused_loss={kind!r} is not one of {', '.join(FUSED_KINDS)}")
    module, package = FUSED_PACKAGES[kind]
    if torch.device(device).type != "cuda":
        raise UserError(f"train.fused_loss={kind} runs {package}'s GPU kernels and this run is on "
                        f"{torch.device(device).type}; use train.loss_chunk_tokens (e.g. 1024) instead")
    if importlib.util.find_spec(module) is None:
        raise UserError(f"train.fused_loss={kind} needs the {package} package: pip install {package} "
                        "(or set train.fused_loss=off and use train.loss_chunk_tokens)")


def _fused_ce(kind: str, hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE [T] from the fused kernel, inputs cast to the compute dtype."""
    dtype = compute_dtype(hidden, weight)
    h, w = hidden.to(dtype), weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    if kind == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(h, w, targets, b, reduction="none")
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, targets, bias=b, reduction="none")


def verify_fused(kind: str, device: torch.device, tolerance: float = 0.05) -> None:
    """Once per process and device type: the kernel's log-probs and gradients (hidden, weight) under
    uneven per-token upstream gradients match the chunked path in fp32 within ``tolerance`` (relative,
    loose enough for bf16 kernels, tight enough to catch a wrongly scaled gradient)."""
    key = (kind, torch.device(device).type)
    if key in _FUSED_VERIFIED:
        return
    require_fused(kind, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(96, 64, generator=gen).to(device)
    weight = (torch.randn(1000, 64, generator=gen) * 0.2).to(device)
    targets = torch.randint(0, 1000, (96,), generator=gen).to(device)
    upstream = torch.rand(96, generator=gen).to(device) * 4  # uneven per-token weights
    results = []
    for path in ("chunked", kind):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        if path == "chunked":
            logp = ChunkedTargetLogprobs.apply(h, w, None, targets, 32, torch.float32)
        else:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                logp = -_fused_ce(kind, h, w, None, targets).float()
        (logp * upstream).sum().backward()
        results.append((logp.detach().float(), h.grad.float(), w.grad.float()))
    package = FUSED_PACKAGES[kind][1]
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    for name, (ref, got) in zip(("log-probs", "hidden gradient", "weight gradient"), zip(*results)):
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
        if not err <= tolerance:
            raise UserError(f"train.fused_loss={kind}: {package} {version} gives a {name} {err:.3g} (relative) away "
                            "from the chunked path under per-token loss weights; upgrade it, or use "
                            "train.fused_loss=off with train.loss_chunk_tokens")
    _FUSED_VERIFIED.add(key)


def fused_token_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, kind: str) -> torch.Tensor:
    weight, bias = _head_weight_bias(head)
    verify_fused(kind, hidden.device)
    return -_fused_ce(kind, hidden, weight, bias, targets).float()


def token_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_tokens: int = 0,
                   fused: str = "off") -> torch.Tensor:
    """``log softmax(head(hidden))[t, targets[t]]`` as fp32 [T] for hidden [T, D], targets [T].

    ``chunk_tokens`` > 0: in chunks of that many tokens with a recomputing backward (no [T, V]
    tensor alive); ``fused`` "liger" / "cce": a fused GPU kernel instead (``chunk_tokens`` unused)."""
    if fused not in FUSED_KINDS:
        raise ValueError(f"fused must be one of {FUSED_KINDS}, got {fused!r}")
    if fused != "off" and hidden.shape[0] > 0:
        return fused_token_logprobs(hidden, head, targets, fused)
    if (chunk_tokens and chunk_tokens > 0) or fused != "off":  # (no tokens: any chunk size)
        return chunked_token_logprobs(hidden, head, targets, max(int(chunk_tokens), 1))
    return full_token_logprobs(hidden, head, targets)
