"""Model section (owned by vlmforge.model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from vlmforge.config.ranges import ranged


@dataclass
class VisionConfig:
    # Local folder or hub id for from_pretrained; None = build randomly initialised from `preset`.
    pretrained: Optional[str] = None
    # Name of a shipped architecture config (e.g. "tiny-siglip", "siglip-so400m-patch14-384") or a path to a config.json.
    preset: str = "tiny-siglip"
    # Which hidden state feeds the projector (transformers hidden_states index): -2 = output of the
    # second-to-last block (Open-Qwen2VL / prismatic). Layers after it are never run.
    feature_layer: int = -2
    frozen: bool = True
    # Run the tower at another resolution than its config (position embeddings interpolated),
    # e.g. 448 px for a patch-14 tower -> 32 x 32 grid. None = the config's image_size.
    image_size: Optional[int] = ranged(None, ge=1)


@dataclass
class LLMConfig:
    pretrained: Optional[str] = None
    preset: str = "tiny-qwen2"
    frozen: bool = False
    # Random init only: std of the attention query/key projections (None = the preset's
    # initializer_range). Larger Q/K weights shorten the plateau before a from-scratch LM learns to
    # look things up by content (research/qa_binding.py).
    qk_init_std: Optional[float] = ranged(None, gt=0)


@dataclass
class ProjectorConfig:
    kind: Literal["avgpool_mlp", "pixel_shuffle_mlp", "mlp"] = "avgpool_mlp"  # see vlmforge.arch.projectors
    # avgpool_mlp: pool the patch grid to pool_size x pool_size tokens; None = full grid.
    # A run setting, not a weight: 12 (144 tokens) in pretraining, None (729) in SFT.
    pool_size: Optional[int] = ranged(None, ge=1)
    # Width of the MLP's hidden layer; None = the LLM's hidden size.
    hidden_size: Optional[int] = ranged(None, ge=1)
    frozen: bool = False


@dataclass
class ImagesConfig:
    """How an image becomes tower inputs and `<image>` placeholders (a run setting, not a weight)."""

    # InternVL's dynamic high resolution (vlmforge.arch.tiles): each image cut into a grid of
    # tower-sized tiles chosen by its aspect ratio, plus a thumbnail; False = one tile per image.
    tiles: bool = False
    min_tiles: int = ranged(1, ge=1)
    # Tile budget per sample (InternVL's max_dynamic_patch): a sample with n images gives each
    # max(1, max_tiles // n). A meta-file source's max_dynamic_patch overrides it for its records.
    max_tiles: int = ranged(12, ge=1)
    thumbnail: bool = True
    # Share max_tiles among a sample's images (InternVL's training rule); False = the whole budget
    # each (InternVL's chat code and transformers' processor, so an imported model evaluates alike).
    share_budget: bool = True
    # Text around each image's placeholders (InternVL: "<img>" and "</img>"); None = nothing.
    start: Optional[str] = None
    end: Optional[str] = None


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    # causal: over the whole pack; document: no attention across packed samples
    attention: Literal["causal", "document"] = "causal"
    # restart: position_ids as given (restart per packed sample); continue: 0..L-1 over the whole row
    # (Open-Qwen2VL); v2pe: text +1, visual tokens +delta (per sample restart)
    positions: Literal["restart", "continue", "v2pe"] = "restart"
    # V2PE at inference (and in eval): fixed delta. In training a delta is drawn per image from
    # {1, 1/2, 1/4, ..., 1/v2pe_max_denominator}.
    v2pe_delta: float = ranged(1.0, gt=0)
    v2pe_max_denominator: int = ranged(256, ge=1)
    # auto: flash-attn varlen when installed and on CUDA, else sdpa with an additive mask
    attn_backend: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    trust_remote_code: bool = False
