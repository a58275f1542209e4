"""Put a model on its device and wrap it for data-parallel training.

FSDP2 (``fully_shard``) per vision block, per decoder layer, then the root. Frozen and trainable
parameters never share a unit except in the root (FSDP2 handles that: it only reduces gradients
that exist). On GPU the mixed-precision policy computes in bf16 and reduces gradients in fp32
while the sharded master weights stay fp32. Activation checkpointing uses transformers' own
gradient checkpointing on the vision tower and the LLM (non-reentrant).

``train.compile``: each decoder layer is compiled before it is sharded (torchtitan's order) with
``nn.Module.compile``, which keeps the module tree and state-dict keys (checkpoints load either
way). Layers share one compiled graph (the same code; parameters are graph inputs). transformers
checkpoints a layer's ``forward`` inside the compiled call, so checkpointing is traced into the
graph, and FSDP2's hooks (which dynamo does not trace) run between the compiled regions.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vlmforge.config.train import TrainConfig
from vlmforge.model.lm_head import require_fused

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Placement:
    device: torch.device
    world_size: int
    sharded: bool  # wrapped with FSDP2
    compute_dtype: torch.dtype  # dtype the forward runs in


def resolve_precision(tcfg: TrainConfig, device: torch.device) -> torch.dtype:
    """train.mixed_precision: auto = bf16 on GPU, fp32 on CPU."""
    mode = str(tcfg.mixed_precision)
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return PRECISIONS[mode]


def _vision_blocks(model: nn.Module) -> list[nn.Module]:
    """Encoder blocks of the vision tower (``VisionLanguageModel.vision_layers()``)."""
    if hasattr(model, "vision_layers"):
        return list(model.vision_layers())
    return []


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "llm_layers"):
        return list(model.llm_layers())
    layers = getattr(getattr(getattr(model, "llm", None), "model", None), "layers", None)
    return list(layers) if layers is not None else []


def enable_activation_checkpointing(model: nn.Module) -> None:
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    for part in (getattr(model, "vision", None), getattr(model, "llm", None)):
        if part is None or not any(p.requires_grad for p in part.parameters()):
            continue  # a frozen tower keeps no activations for backward anyway
        target = next((m for m in part.modules() if hasattr(m, "gradient_checkpointing_enable")), None)
        if target is None:
            raise ValueError(f"{type(part).__name__} does not support activation checkpointing")
        if hasattr(target, "activation_checkpointing_enable"):  # transformers 5 name
            target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            target.gradient_checkpointing_enable(**kwargs)


def compile_decoder_layers(model: nn.Module) -> int:
    """torch.compile every decoder layer in place; returns how many."""
    layers = _decoder_layers(model)
    with warnings.catch_warnings():
        # the first torch.compile imports inductor, whose own modules still use torch.jit.script_method
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.* is deprecated", category=DeprecationWarning)
        for layer in layers:
            layer.compile()
    return len(layers)


def apply_loss_settings(model: nn.Module, tcfg: TrainConfig, device: torch.device) -> None:
    """train.loss_chunk_tokens / train.fused_loss onto the model (its forward computes the loss's log-probs)."""
    require_fused(str(tcfg.fused_loss), device)
    if hasattr(model, "loss_chunk_tokens"):
        model.loss_chunk_tokens = int(tcfg.loss_chunk_tokens)
    if hasattr(model, "fused_loss"):
        model.fused_loss = str(tcfg.fused_loss)


def shard_model(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    mp = None
    if compute_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if mp is not None else {}
    for block in _vision_blocks(model):
        fully_shard(block, **kw)
    for layer in _decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def place_model(model: nn.Module, tcfg: TrainConfig, device: torch.device, world_size: int) -> tuple[nn.Module, Placement]:
    """Move to device, set the loss path, enable activation checkpointing, compile the decoder
    layers (train.compile), then shard when several processes run."""
    compute = resolve_precision(tcfg, device)
    apply_loss_settings(model, tcfg, device)
    model.to(device)
    if tcfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if tcfg.compile:
        compile_decoder_layers(model)
    sharded = world_size > 1 and bool(tcfg.fsdp)
    if world_size > 1 and not sharded:
        raise ValueError("several processes need train.fsdp=true (the only data-parallel wrapper here)")
    if sharded:
        shard_model(model, compute)
    return model, Placement(device=device, world_size=world_size, sharded=sharded, compute_dtype=compute)


def autocast_context(placement: Placement):
    """Single-process GPU runs get bf16 via autocast (FSDP's policy does it when sharded)."""
    if placement.sharded or placement.compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(placement.device.type, dtype=placement.compute_dtype)
