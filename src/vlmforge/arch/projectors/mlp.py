"""`mlp` projector: Linear -> GELU -> Linear on every patch (LLaVA's multi_modal_projector).

Every projector kind is one class with `kind` (its recipe name), `tokens` (visual tokens per image
for a patch grid), `from_config` (built from the recipe's `model.projector` section) and
`export_refusal` (None when it maps onto LLaVA's projector, else why not). The other kinds
subclass this one, so all end in `linear_1 -> GELU -> linear_2` (LLaVA's names).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmforge.config.model import ProjectorConfig
from vlmforge.errors import ConfigError


def square_grid(x: torch.Tensor) -> int:
    """Patches per side of row-major patch features [N, side*side, C]."""
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"projector expects a square patch grid, got {x.shape[1]} patches")
    return side


class MLPProjector(nn.Module):
    """Linear -> GELU -> Linear on every patch (LLaVA's projector)."""

    kind = "mlp"

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or out_dim
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, out_dim)

    @classmethod
    def tokens(cls, grid: int, pool_size: int | None) -> int:
        """Visual tokens per image for a grid x grid patch grid (one per patch)."""
        return grid * grid

    @classmethod
    def from_config(cls, proj_cfg: ProjectorConfig, vision_dim: int, llm_dim: int) -> MLPProjector:
        if proj_cfg.pool_size is not None:
            raise ConfigError(
                f"model.projector.pool_size is only used by avgpool_mlp, not {cls.kind!r}; set it to null"
            )
        return cls(vision_dim, llm_dim, proj_cfg.hidden_size)

    def export_refusal(self, grid: int) -> str | None:
        """None: linear_1 / linear_2 are LLaVA's multi_modal_projector as they are."""
        return None

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


PROJECTOR = MLPProjector
