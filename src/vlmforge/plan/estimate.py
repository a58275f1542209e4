"""Memory per GPU and time of a training run, from the model's shape and the run's settings.

Memory (bytes per GPU) follows what vlmforge's trainer allocates (train/parallel.py, model/lm_head.py):

- model states, FSDP2 over S GPUs (S = 1 without sharding): fp32 master weights ``4 P / S``, fp32
  gradients ``4 P_train / S``, optimizer states ``8 P_train / S`` for AdamW (two fp32 moments), or
  ``4`` per Muon matrix parameter (one momentum) and ``8`` for the rest with Muon.
- gathered copies, sharded: the root unit in the compute dtype (``cb`` bytes) for the whole step
  plus its unsharded gradient, two decoder layers (the one computing and the prefetched one) and
  one layer's unsharded gradient with its fp32 reduce-scatter copy. One GPU in bf16: autocast's
  cached bf16 copy of every trainable weight.
- activations kept for backward, per token of the micro-batch (measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on a transformers Qwen2 decoder layer, see
  tests/test_plan.py): ``2 (4 + 2 cb) h`` for the two RMSNorms (fp32 upcast, normalised cast,
  scaled output) ``+ cb (2 q + 2 kv)`` (rotated queries, rotated keys, values, attention output)
  ``+ 4 cb I`` (SwiGLU: gate, up, silu(gate), their product) ``+ 4 heads + 8`` (log-sum-exp, rsqrt),
  with ``kv`` the key/value width for flash-attn and the query width for sdpa (repeat_kv copies);
  sdpa and eager also hold the additive mask ``L x L`` per row, eager the attention probabilities
  ``(4 + cb) heads L`` per token and layer. With activation checkpointing a layer keeps only its
  input (``cb h``) and one layer is recomputed at a time. Backward adds one layer's worth of
  activation gradients. A trained vision tower: ``cb (8 hv + 2 Iv) + 4 heads + 4 cb`` per patch and
  block (SigLIP/CLIP layer, measured the same way); a frozen one keeps nothing (its forward is over
  before the peak). A trained projector: ``cb (hv + 2 h)`` per visual token.
- logits: the head runs on the supervised positions only (``T_sup`` tokens). Full: ``12 T_sup V``
  at the start of backward (fp32 log-softmax kept, its gradient, and the logits' gradient).
  Chunked (train.loss_chunk_tokens = c): ``(4 + cb) c V`` (one chunk's fp32 logits and their
  compute-dtype copy) plus the fp32 head-weight gradient accumulator ``4 V h``.
- reserve: CUDA context, NCCL buffers and allocator fragmentation, an assumption:
  ``RESERVE_BYTES + RESERVE_FRACTION`` of the rest.

Time: model FLOPs per token from vlmforge.model.flops (LLM matmuls + attention over the span a
token attends to + its share of the image's tower and projector FLOPs), total = tokens x that,
GPU-seconds = total / (peak x MFU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlmforge.plan.hardware import GIB, GPU
from vlmforge.plan.shape import ModelShape

RESERVE_BYTES = 1.5 * GIB  # CUDA context + NCCL buffers (an assumption, printed with the plan)
RESERVE_FRACTION = 0.05  # caching-allocator fragmentation
# An MFU assumed when none is measured (an assumption, printed with the plan): measure the real one
# with bench/gpu_check.sh.
DEFAULT_MFU = 0.35
ATTENTION_KERNELS = ("flash", "sdpa", "eager")


@dataclass(frozen=True)
class Workload:
    gpus: int
    micro_batch: int
    seq_len: int
    visual_fraction: float  # share of the packed tokens that are image tokens
    supervised_fraction: float  # share of the tokens with a loss (the head runs on those only)
    compute_bytes: int  # 2 = bf16, 4 = fp32
    optimizer: str = "adamw"  # adamw | muon
    sharded: bool = True  # FSDP2 over the GPUs (train.fsdp and gpus > 1)
    attention_kernel: str = "flash"  # flash | sdpa | eager

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one GPU."""
        return self.micro_batch * self.seq_len

    @property
    def visual_tokens(self) -> float:
        """Image tokens of one micro-batch."""
        return self.tokens * self.visual_fraction

    @property
    def shards(self) -> int:
        return self.gpus if self.sharded and self.gpus > 1 else 1


def model_states(shape: ModelShape, w: Workload) -> dict[str, float]:
    """Sharded fp32 weights, gradients and optimizer states, and the gathered compute copies."""
    s, cb = w.shards, w.compute_bytes
    if w.optimizer == "muon":
        optim = 4 * shape.params_muon + 8 * (shape.params_trainable - shape.params_muon)
    else:
        optim = 8 * shape.params_trainable
    if s > 1:
        gathered = (cb * (shape.params_root + shape.params_root_trainable) + 2 * cb * shape.params_largest_unit
                    + (cb + 4) * shape.params_largest_unit)
    else:
        gathered = cb * shape.params_trainable if cb < 4 else 0
    return {
        "parameters": 4 * shape.params_total / s,
        "gradients": 4 * shape.params_trainable / s,
        "optimizer": optim / s,
        "gathered": float(gathered),
    }


def llm_layer_bytes_per_token(shape: ModelShape, w: Workload) -> float:
    """Activation bytes one decoder layer keeps for backward per token (see the module docstring)."""
    cb, h = w.compute_bytes, shape.hidden
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim if w.attention_kernel == "flash" else q
    per = 2 * (4 + 2 * cb) * h + cb * (2 * q + 2 * kv) + 4 * cb * shape.intermediate + 4 * shape.heads + 8
    if w.attention_kernel == "eager":
        per += (4 + cb) * shape.heads * w.seq_len
    return float(per)


def vision_layer_bytes_per_patch(shape: ModelShape, w: Workload) -> float:
    cb = w.compute_bytes
    return float(cb * (8 * shape.vision_hidden + 2 * shape.vision_intermediate) + 4 * shape.vision_heads + 4 * cb)


def activations(shape: ModelShape, w: Workload, checkpointing: bool) -> float:
    """Activation bytes alive at the start of backward, plus one layer's activation gradients."""
    cb, t = w.compute_bytes, w.tokens
    layer = llm_layer_bytes_per_token(shape, w) * t
    if checkpointing:
        llm = shape.layers * cb * shape.hidden * t + layer  # layer inputs + one layer recomputed
    else:
        llm = shape.layers * layer
    llm += layer  # gradients of one layer's activations in flight
    llm += (4 + 2 * cb) * shape.hidden * t  # the final norm (its output is the head's input)
    if w.attention_kernel != "flash":
        llm += cb * w.micro_batch * w.seq_len**2  # the additive mask, shared by the layers
    patches = w.visual_tokens / shape.tokens_per_image * shape.patches
    vision = 0.0
    if shape.vision_trains and patches > 0:
        per = vision_layer_bytes_per_patch(shape, w) * patches
        kept = shape.vision_layers * cb * shape.vision_hidden * patches + per if checkpointing else shape.vision_layers * per
        vision = kept + per
    projector = cb * (shape.vision_hidden + 2 * shape.hidden) * w.visual_tokens if shape.projector_trains else 0.0
    return float(llm + vision + projector)


def logits(shape: ModelShape, w: Workload, chunk_tokens: int) -> float:
    """Bytes of the head's logits and their gradients at their peak (chunk_tokens 0 = all at once)."""
    sup = w.tokens * w.supervised_fraction
    if chunk_tokens <= 0:
        return 12.0 * sup * shape.vocab
    c = min(chunk_tokens, math.ceil(sup))
    return float((4 + w.compute_bytes) * c * shape.vocab + 4 * shape.vocab * shape.hidden)


def with_reserve(total: float) -> float:
    return total * (1 + RESERVE_FRACTION) + RESERVE_BYTES


def memory_plan(shape: ModelShape, w: Workload, checkpointing: bool, chunk_tokens: int) -> dict:
    """Every term in bytes per GPU, for the four combinations of checkpointing x chunked loss too."""
    states = model_states(shape, w)
    state_bytes = sum(states.values())
    acts = {ck: activations(shape, w, ck) for ck in (False, True)}
    chunk = chunk_tokens if chunk_tokens > 0 else 1024
    heads = {"full": logits(shape, w, 0), "chunked": logits(shape, w, chunk)}
    combos = {}
    for ck in (False, True):
        for name, value in heads.items():
            combos[(ck, name)] = with_reserve(state_bytes + acts[ck] + value)
    chosen = (checkpointing, "chunked" if chunk_tokens > 0 else "full")
    return {"states": states, "activations": acts, "logits": heads, "chunk_tokens": chunk,
            "totals": combos, "chosen": chosen, "total": combos[chosen]}


def span(shape: ModelShape, w: Workload, attention: str) -> float:
    """Tokens each token attends over: the row (causal), or the mean document (document attention:
    one image-caption sample = tokens_per_image / visual_fraction)."""
    if attention == "document" and w.visual_fraction > 0:
        return min(float(w.seq_len), shape.tokens_per_image / w.visual_fraction)
    return float(w.seq_len)


def flops_per_token(shape: ModelShape, w: Workload, attention: str) -> float:
    """Model FLOPs of one trained token, averaged over text and image tokens."""
    images_per_token = w.visual_fraction / shape.tokens_per_image
    return shape.llm_token_flops(span(shape, w, attention)) + images_per_token * shape.image_flops


def time_plan(total_tokens: float, per_token: float, gpu: GPU, gpus: int, mfu: float) -> dict:
    """GPU-hours and wall time of ``total_tokens`` at ``mfu`` of ``gpu``'s dense bf16 peak."""
    total = total_tokens * per_token
    gpu_seconds = total / (gpu.peak_bf16_flops * mfu)
    return {"flops": total, "gpu_hours": gpu_seconds / 3600, "wall_hours": gpu_seconds / gpus / 3600,
            "tokens_per_second_per_gpu": gpu.peak_bf16_flops * mfu / per_token}


def implied_mfu(total_tokens: float, per_token: float, gpu: GPU, gpu_hours: float) -> float:
    """The MFU a run of ``total_tokens`` that took ``gpu_hours`` on ``gpu`` ran at."""
    return total_tokens * per_token / (gpu_hours * 3600 * gpu.peak_bf16_flops)
