"""Vision pretraining section (owned by vlmforge.vision): a tiny vision tower trained on labelled
objects before the VLM uses it (the demo's stand-in for a pretrained SigLIP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class VisionPretrainConfig:
    arch: Literal["clip", "siglip"] = "clip"  # CLIPVisionModel or SiglipVisionModel
    init: Optional[str] = None  # fine-tune this tower folder instead of starting from random weights
    # From-scratch architecture. The default puts one 24 px patch on each cell of the world's 3x3
    # grid at 72 px, so every visual token is one cell.
    image_size: int = 72
    patch_size: int = 24
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    feature_layer: int = -1  # hidden_states index the heads read (use the same model.vision.feature_layer)
    grid: int = 3  # label cells per side (objects' positions name cells of this grid)
    # Also train a head that names each cell's own place in the grid, so the features keep where
    # they are (as a pretrained ViT's do); without it "where is ..." questions sat at chance.
    position_head: bool = True
    epochs: int = 25
    batch_size: int = 64
    lr: float = 1.0e-3
    weight_decay: float = 0.01
    holdout_frac: float = 0.1
    seed: int = 0
