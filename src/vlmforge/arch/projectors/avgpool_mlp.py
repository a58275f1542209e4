"""`avgpool_mlp` projector (Open-Qwen2VL): average-pool the patch grid to k x k, then the MLP.

The number of output tokens is a run setting (`pool_size`), not a weight: one checkpoint can train
at 144 and at 729 tokens, and a full-grid run (pool_size null) exports to LLaVA as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmforge.arch.projectors.mlp import MLPProjector, square_grid
from vlmforge.config.model import ProjectorConfig
from vlmforge.errors import ConfigError


class AvgPoolMLPProjector(MLPProjector):
    """Open-Qwen2VL: AdaptiveAvgPool2d of the patch grid to k x k (27x27 -> 12x12 = 144), then the MLP."""

    kind = "avgpool_mlp"

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, pool_size: int | None = None):
        super().__init__(in_dim, out_dim, hidden)
        self.pool_size = pool_size  # run setting; None = full grid (no pooling)

    @classmethod
    def tokens(cls, grid: int, pool_size: int | None) -> int:
        if pool_size is None:
            return grid * grid
        if not 1 <= pool_size <= grid:
            raise ConfigError(f"model.projector.pool_size={pool_size} must be between 1 and the patch grid ({grid})")
        return pool_size * pool_size

    @classmethod
    def from_config(cls, proj_cfg: ProjectorConfig, vision_dim: int, llm_dim: int) -> AvgPoolMLPProjector:
        return cls(vision_dim, llm_dim, proj_cfg.hidden_size, proj_cfg.pool_size)

    def export_refusal(self, grid: int) -> str | None:
        k = self.pool_size
        if k in (None, grid):
            return None
        return (
            f"its projector pools the {grid}x{grid} patch grid to {k}x{k} = {self.tokens(grid, k)} tokens; "
            "LLaVA has no pooling. The weights are resolution-independent: export the full-grid model with "
            "--set model.projector.pool_size=null (fine-tune at full resolution first for best results)"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = square_grid(x)
        k = self.pool_size
        if k is not None and k != side:
            n, _, d = x.shape
            grid = x.transpose(1, 2).reshape(n, d, side, side)  # row-major patches -> [N, D, H, W]
            x = F.adaptive_avg_pool2d(grid, k).flatten(2).transpose(1, 2)
        return self.mlp(x)


PROJECTOR = AvgPoolMLPProjector
