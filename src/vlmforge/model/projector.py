"""Projectors: vision patch features [N, P, Dv] -> LLM-sized visual tokens [N, T, Dl].

All three end in `linear_1 -> GELU -> linear_2` (the names LLaVA's multi_modal_projector uses, so a
full-grid `mlp`/`avgpool_mlp` projector exports 1:1). The number of output tokens of `avgpool_mlp`
is a run setting (`pool_size`), not a weight: one checkpoint can train at 144 and at 729 tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmforge.errors import ConfigError


def _square_grid(x: torch.Tensor) -> int:
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"projector expects a square patch grid, got {x.shape[1]} patches")
    return side


class MLPProjector(nn.Module):
    """Linear -> GELU -> Linear on every patch (LLaVA's projector)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or out_dim
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, out_dim)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class AvgPoolMLPProjector(MLPProjector):
    """Open-Qwen2VL: AdaptiveAvgPool2d of the patch grid to k x k (27x27 -> 12x12 = 144), then the MLP."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, pool_size: int | None = None):
        super().__init__(in_dim, out_dim, hidden)
        self.pool_size = pool_size  # run setting; None = full grid (no pooling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = _square_grid(x)
        k = self.pool_size
        if k is not None and k != side:
            n, _, d = x.shape
            grid = x.transpose(1, 2).reshape(n, d, side, side)  # row-major patches -> [N, D, H, W]
            x = F.adaptive_avg_pool2d(grid, k).flatten(2).transpose(1, 2)
        return self.mlp(x)


def pixel_shuffle(x: torch.Tensor, side: int) -> torch.Tensor:
    """InternVL's pixel_shuffle(scale 0.5, ps_version 'v2') on row-major patches [N, side*side, C].

    Output token (a, b) (row-major over the (side/2)^2 grid) holds the channels of patches
    (2a, 2b), (2a, 2b+1), (2a+1, 2b), (2a+1, 2b+1), in that order.
    """
    n, _, c = x.shape
    if side % 2:
        raise ValueError(
            f"pixel_shuffle_mlp merges 2x2 patches and needs an even patch grid, got {side}x{side} "
            "(set model.vision.image_size so that image_size / patch_size is even)"
        )
    x = x.reshape(n, side, side, c).contiguous()
    # Same view/permute sequence as InternVL (its names w, h are our rows, cols).
    x = x.view(n, side, side // 2, c * 2)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, side // 2, side // 2, c * 4)
    x = x.permute(0, 2, 1, 3).contiguous()  # v2: back to row-major
    return x.reshape(n, (side // 2) ** 2, c * 4)


class PixelShuffleMLPProjector(MLPProjector):
    """InternVL: 2x2 patches -> channels, then LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__(in_dim * 4, out_dim, hidden)
        self.norm = nn.LayerNorm(in_dim * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(pixel_shuffle(x, _square_grid(x))))


def build_projector(proj_cfg, vision_dim: int, llm_dim: int) -> nn.Module:
    kind, hidden = proj_cfg.kind, proj_cfg.hidden_size
    if kind == "avgpool_mlp":
        return AvgPoolMLPProjector(vision_dim, llm_dim, hidden, proj_cfg.pool_size)
    if proj_cfg.pool_size is not None:
        raise ConfigError(f"model.projector.pool_size is only used by avgpool_mlp, not {kind!r}; set it to null")
    if kind == "pixel_shuffle_mlp":
        return PixelShuffleMLPProjector(vision_dim, llm_dim, hidden)
    if kind == "mlp":
        return MLPProjector(vision_dim, llm_dim, hidden)
    raise ConfigError(f"model.projector.kind {kind!r} is not one of avgpool_mlp, pixel_shuffle_mlp, mlp")
