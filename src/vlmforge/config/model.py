"""Model section (owned by vlmforge.model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class VisionConfig:
    # Local folder or hub id for from_pretrained; None = build randomly initialised from `preset`.
    pretrained: Optional[str] = None
    # Name of a shipped architecture config (e.g. "tiny-siglip", "siglip-so400m-patch14-384") or a path to a config.json.
    preset: str = "tiny-siglip"
    feature_layer: int = -2
    frozen: bool = True


@dataclass
class LLMConfig:
    pretrained: Optional[str] = None
    preset: str = "tiny-qwen2"


@dataclass
class ProjectorConfig:
    kind: str = "avgpool_mlp"  # avgpool_mlp | pixel_shuffle_mlp | mlp
    # avgpool_mlp: pool the patch grid to pool_size x pool_size tokens; None = full grid.
    # A run setting, not a weight: 12 (144 tokens) in pretraining, None (729) in SFT.
    pool_size: Optional[int] = None


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    attention: str = "causal"  # causal (over the whole pack) | document (no attention across samples)
    positions: str = "restart"  # restart (per sample) | v2pe
    trust_remote_code: bool = False
