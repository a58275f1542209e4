"""Vision tower: a transformers SiglipVisionModel, CLIPVisionModel or InternVLVisionModel (InternViT),
run up to the feature layer.

`feature_layer` follows transformers' hidden_states indexing (0 = embeddings, -1 = last block,
before SigLIP's post_layernorm), which is what LLaVA's `vision_feature_layer` means, so training and
export see identical features. We run the blocks ourselves and stop at the feature layer: later
blocks (and the post-layernorm / pooling head) are never run and are kept frozen.

InternViT follows InternVL's rule instead: -1 is the tower's `last_hidden_state` (the last block
through the tower's final `layernorm`, an Identity in every published InternViT, which mean-pool),
any other index is hidden_states[index]; its CLS token is dropped (InternVL's "default" strategy),
and a tower run off its native resolution interpolates its position embeddings itself.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel, InternVLVisionModel, SiglipVisionModel

from vlmforge.arch.presets import vision_config
from vlmforge.config.model import VisionConfig
from vlmforge.errors import ConfigError

INTERNVIT = "internvl_vision"
TOWER_CLASSES = {"siglip_vision_model": SiglipVisionModel, "clip_vision_model": CLIPVisionModel,
                 INTERNVIT: InternVLVisionModel}


def square_sizes_(cfg) -> None:
    """InternVLVisionConfig keeps image_size / patch_size as (height, width) pairs; vlmforge's
    geometry reads one side. The modules have copied the pairs when built, so the config can hold
    the side (an int, which the config class accepts and turns back into a pair when loaded)."""
    for key in ("image_size", "patch_size"):
        value = getattr(cfg, key)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ConfigError(f"model.vision: {key} {list(value)} is not square; vlmforge runs square images")
            setattr(cfg, key, int(value[0]))


def build_vision_tower(vision_cfg: VisionConfig, trust_remote_code: bool = False) -> nn.Module:
    cfg = vision_config(vision_cfg)
    cls = TOWER_CLASSES[cfg.model_type]
    if vision_cfg.pretrained:
        extra = {"vision_use_head": False} if cls is SiglipVisionModel else {}
        tower = cls.from_pretrained(vision_cfg.pretrained, attn_implementation="sdpa", dtype=torch.float32, **extra)
    else:
        cfg._attn_implementation = "sdpa"
        tower = cls(cfg)
    if is_internvit(tower):
        square_sizes_(tower.config)
    return tower


def is_clip(tower: nn.Module) -> bool:
    return tower.config.model_type == "clip_vision_model"


def is_internvit(tower: nn.Module) -> bool:
    return tower.config.model_type == INTERNVIT


def has_cls_token(tower: nn.Module) -> bool:
    """Whether the tower's sequence carries a CLS token before the patches (CLIP, InternViT)."""
    return is_clip(tower) or is_internvit(tower)


def inner(tower: nn.Module) -> nn.Module:
    """The module holding embeddings/encoder (transformers 5 flattened away `vision_model`)."""
    return getattr(tower, "vision_model", tower)


def patch_embedding(tower: nn.Module) -> nn.Module:
    """The convolution that turns pixels into patch embeddings."""
    emb = inner(tower).embeddings
    return emb.patch_embeddings.projection if is_internvit(tower) else emb.patch_embedding


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    encoder = inner(tower).encoder
    return encoder.layer if is_internvit(tower) else encoder.layers


def layers_used(tower: nn.Module, feature_layer: int) -> int:
    """How many encoder blocks produce hidden_states[feature_layer]."""
    n = len(encoder_layers(tower))
    idx = feature_layer if feature_layer >= 0 else n + 1 + feature_layer
    if not 0 <= idx <= n:
        raise ConfigError(f"model.vision.feature_layer={feature_layer} is out of range for a {n}-layer tower")
    return idx


def patch_features(tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, patches, D]: hidden_states[feature_layer] without CLS (CLIP's and
    InternViT's are dropped). N is images or tiles alike: each is one pass of the tower."""
    vm = inner(tower)
    pixel_values = pixel_values.to(patch_embedding(tower).weight.dtype)
    if is_internvit(tower):
        h = vm.embeddings(pixel_values)  # interpolates the position embeddings off the native size
        for layer in encoder_layers(tower)[: layers_used(tower, feature_layer)]:
            h = layer(h)
        if feature_layer == -1:
            h = vm.layernorm(h)  # InternVL reads last_hidden_state at -1
        return h[:, 1:]
    native = tower.config.image_size
    interpolate = pixel_values.shape[-1] != native or pixel_values.shape[-2] != native
    h = vm.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
    if is_clip(tower):
        h = vm.pre_layrnorm(h)
        for layer in encoder_layers(tower)[: layers_used(tower, feature_layer)]:
            h = layer(h, None)
        return h[:, 1:]
    for layer in encoder_layers(tower)[: layers_used(tower, feature_layer)]:
        h = layer(h, None)
    return h
