"""Vision tower: a transformers SiglipVisionModel or CLIPVisionModel, run up to the feature layer.

`feature_layer` follows transformers' hidden_states indexing (0 = embeddings, -1 = last block,
before SigLIP's post_layernorm), which is what LLaVA's `vision_feature_layer` means, so training and
export see identical features. We run the blocks ourselves and stop at the feature layer: later
blocks (and the post-layernorm / pooling head) are never run and are kept frozen.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel, SiglipVisionModel

from vlmforge.arch.presets import vision_config
from vlmforge.config.model import VisionConfig
from vlmforge.errors import ConfigError


def build_vision_tower(vision_cfg: VisionConfig, trust_remote_code: bool = False) -> nn.Module:
    cfg = vision_config(vision_cfg)
    cls = CLIPVisionModel if cfg.model_type == "clip_vision_model" else SiglipVisionModel
    if vision_cfg.pretrained:
        extra = {"vision_use_head": False} if cls is SiglipVisionModel else {}
        return cls.from_pretrained(
            vision_cfg.pretrained, attn_implementation="sdpa", dtype=torch.float32, **extra
        )
    cfg._attn_implementation = "sdpa"
    return cls(cfg)


def is_clip(tower: nn.Module) -> bool:
    return tower.config.model_type == "clip_vision_model"


def inner(tower: nn.Module) -> nn.Module:
    """The module holding embeddings/encoder (transformers 5 flattened away `vision_model`)."""
    return getattr(tower, "vision_model", tower)


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    return inner(tower).encoder.layers


def layers_used(tower: nn.Module, feature_layer: int) -> int:
    """How many encoder blocks produce hidden_states[feature_layer]."""
    n = len(encoder_layers(tower))
    idx = feature_layer if feature_layer >= 0 else n + 1 + feature_layer
    if not 0 <= idx <= n:
        raise ConfigError(f"model.vision.feature_layer={feature_layer} is out of range for a {n}-layer tower")
    return idx


def patch_features(tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, patches, D]: hidden_states[feature_layer] without CLS (CLIP's is dropped)."""
    vm = inner(tower)
    native = tower.config.image_size
    interpolate = pixel_values.shape[-1] != native or pixel_values.shape[-2] != native
    h = vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype), interpolate_pos_encoding=interpolate)
    if is_clip(tower):
        h = vm.pre_layrnorm(h)
        for layer in encoder_layers(tower)[: layers_used(tower, feature_layer)]:
            h = layer(h, None)
        return h[:, 1:]
    for layer in encoder_layers(tower)[: layers_used(tower, feature_layer)]:
        h = layer(h, None)
    return h
