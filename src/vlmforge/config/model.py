"""Model section (owned by vlmforge.model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class VisionConfig:
    # Local folder or hub id for from_pretrained; None = build randomly initialised from `preset`.
    pretrained: Optional[str] = None
    preset: str = "tiny"
    feature_layer: int = -2
    frozen: bool = True


@dataclass
class LLMConfig:
    pretrained: Optional[str] = None
    preset: str = "tiny"


@dataclass
class ProjectorConfig:
    kind: str = "avgpool_mlp"


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    trust_remote_code: bool = False
