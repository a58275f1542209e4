"""Vision pretraining section (owned by vlmforge.vision): a tiny vision tower trained on labelled
objects before the VLM uses it (the demo's stand-in for a pretrained SigLIP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from vlmforge.config.ranges import ranged


@dataclass
class VisionPretrainConfig:
    arch: Literal["clip", "siglip"] = "clip"  # CLIPVisionModel or SiglipVisionModel
    init: Optional[str] = None  # fine-tune this tower folder instead of starting from random weights
    # From-scratch architecture. The default puts one 24 px patch on each cell of the world's 3x3
    # grid at 72 px, so every visual token is one cell.
    image_size: int = ranged(72, ge=1)
    patch_size: int = ranged(24, ge=1)
    hidden_size: int = ranged(64, ge=1)
    num_layers: int = ranged(2, ge=1)
    num_heads: int = ranged(4, ge=1)
    feature_layer: int = -1  # hidden_states index the heads read (use the same model.vision.feature_layer)
    grid: int = ranged(3, ge=1)  # label cells per side (objects' positions name cells of this grid)
    # Also train a head that names each cell's own place in the grid, so the features keep where
    # they are (as a pretrained ViT's do); without it "where is ..." questions sat at chance.
    position_head: bool = True
    epochs: int = ranged(25, ge=1)
    batch_size: int = ranged(64, ge=1)
    lr: float = ranged(1.0e-3, ge=0)  # 0 keeps the weights where they start (e.g. from `init`)
    weight_decay: float = ranged(0.01, ge=0)
    holdout_frac: float = ranged(0.1, ge=0, lt=1)
    seed: int = 0
