"""Image geometry of a model config: visual tokens per image and image preprocessing.

Cheap (reads only the architecture JSON, builds no model) so the data layer can expand each
`<image>` into the right number of placeholder tokens and preprocess images the same way the
vision tower expects.
"""

from __future__ import annotations

import transformers

from vlmforge.arch.presets import vision_config_dict
from vlmforge.arch.projectors import projector_class
from vlmforge.arch.tiles import ImageLayout, Tiling
from vlmforge.config.model import ImagesConfig, ModelConfig
from vlmforge.errors import ConfigError

SIGLIP_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
CLIP_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
IMAGENET_MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # InternViT (InternVL's image processor)


def image_size(model_cfg: ModelConfig) -> int:
    d = vision_config_dict(model_cfg.vision)
    return int(model_cfg.vision.image_size or d.get("image_size", 224))


def patch_grid(model_cfg: ModelConfig) -> int:
    """Patches per side of the vision tower's output grid (SigLIP: no CLS; CLIP's CLS is dropped)."""
    d = vision_config_dict(model_cfg.vision)
    size, patch = image_size(model_cfg), int(d.get("patch_size", 16))
    if size < patch:
        raise ConfigError(f"model.vision: image size {size} is smaller than the patch size {patch}")
    return size // patch  # a stride-`patch` conv without padding: 384 px / 14 -> 27 (border pixels unused)


def visual_tokens_per_image(model_cfg: ModelConfig) -> int:
    """Number of `<image>` tokens one image becomes (a run setting: depends on pool_size, not on weights)."""
    proj = model_cfg.projector
    return projector_class(proj.kind).tokens(patch_grid(model_cfg), proj.pool_size)


def wrap_ids(tokenizer, text: str | None) -> tuple[int, ...]:
    """Token ids of a wrap string (``<img>``), without special tokens added; () for None."""
    if not text:
        return ()
    if tokenizer is None:
        raise ConfigError(f"model.images: the wrap {text!r} needs a tokenizer to become token ids")
    return tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))


def layout_from(images: ImagesConfig, tokens_per_tile: int, tile: int, tokenizer=None, wrap: bool = True) -> ImageLayout:
    """The :class:`ImageLayout` of an ``images`` section for a tower of ``tile`` pixels that gives
    ``tokens_per_tile`` tokens per pass (what a loaded model and a recipe both build it from).
    ``wrap=False``: without the start/end ids (for counting tiles where no tokenizer is at hand)."""
    tiling = Tiling(int(tile), int(images.min_tiles), int(images.max_tiles), bool(images.thumbnail),
                    bool(images.share_budget)) if images.tiles else None
    if not wrap:
        return ImageLayout(int(tokens_per_tile), tiling)
    return ImageLayout(int(tokens_per_tile), tiling, wrap_ids(tokenizer, images.start), wrap_ids(tokenizer, images.end))


def image_layout(model_cfg: ModelConfig, tokenizer=None, wrap: bool = True) -> ImageLayout:
    """How a recipe's model turns each image into tower passes and placeholder ids; ``tokenizer``
    is needed only when ``model.images.start`` / ``end`` wrap the placeholders in text."""
    return layout_from(model_cfg.images, visual_tokens_per_image(model_cfg), image_size(model_cfg), tokenizer, wrap)


def preprocess_spec_for(model_type: str, size: int) -> dict:
    """Resize to size x size, multiply by `rescale`, normalise with mean/std (per channel, RGB):
    CLIP's statistics for CLIP towers, ImageNet's for InternViT, SigLIP's (0.5) otherwise."""
    if model_type.startswith("clip"):
        mean, std = CLIP_MEAN_STD
    elif model_type == "internvl_vision":
        mean, std = IMAGENET_MEAN_STD
    else:
        mean, std = SIGLIP_MEAN_STD
    return dict(size=int(size), mean=list(mean), std=list(std), rescale=1 / 255)


def image_preprocess_spec(model_cfg: ModelConfig) -> dict:
    return preprocess_spec_for(vision_config_dict(model_cfg.vision).get("model_type", ""), image_size(model_cfg))


def build_image_processor(arch: str, size: int):
    """The transformers image processor saved next to a CLIP / SigLIP model we train (same statistics).
    The classes are looked up here, not imported by name: without torchvision transformers warns on
    that lookup (and falls back to the PIL processors), which should not happen on every import."""
    if arch == "siglip":
        mean, std = SIGLIP_MEAN_STD
        return transformers.SiglipImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    mean, std = CLIP_MEAN_STD
    return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                           image_mean=mean, image_std=std)
