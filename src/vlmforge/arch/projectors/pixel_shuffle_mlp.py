"""`pixel_shuffle_mlp` projector (InternVL): 2x2 patches -> channels, then LayerNorm and the MLP."""

from __future__ import annotations

import torch
from torch import nn

from vlmforge.arch.projectors.mlp import MLPProjector, square_grid
from vlmforge.errors import ConfigError

ODD_GRID_HINT = "(set model.vision.image_size so that image_size / patch_size is even)"


def pixel_shuffle(x: torch.Tensor, side: int) -> torch.Tensor:
    """InternVL's pixel_shuffle(scale 0.5, ps_version 'v2') on row-major patches [N, side*side, C].

    Output token (a, b) (row-major over the (side/2)^2 grid) holds the channels of patches
    (2a, 2b), (2a, 2b+1), (2a+1, 2b), (2a+1, 2b+1), in that order.
    """
    n, _, c = x.shape
    if side % 2:
        raise ValueError(f"pixel_shuffle_mlp merges 2x2 patches and needs an even patch grid, got {side}x{side} "
                         + ODD_GRID_HINT)
    x = x.reshape(n, side, side, c).contiguous()
    # Same view/permute sequence as InternVL (its names w, h are our rows, cols).
    x = x.view(n, side, side // 2, c * 2)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, side // 2, side // 2, c * 4)
    x = x.permute(0, 2, 1, 3).contiguous()  # v2: back to row-major
    return x.reshape(n, (side // 2) ** 2, c * 4)


class PixelShuffleMLPProjector(MLPProjector):
    """InternVL: 2x2 patches -> channels, then LayerNorm -> Linear -> GELU -> Linear."""

    kind = "pixel_shuffle_mlp"

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__(in_dim * 4, out_dim, hidden)
        self.norm = nn.LayerNorm(in_dim * 4)

    @classmethod
    def tokens(cls, grid: int, pool_size: int | None) -> int:
        if grid % 2:
            raise ConfigError(
                f"pixel_shuffle_mlp merges 2x2 patches and needs an even patch grid; this tower gives "
                f"{grid}x{grid} " + ODD_GRID_HINT
            )
        return (grid // 2) ** 2

    def export_refusal(self, grid: int) -> str | None:
        return (
            "its projector is pixel_shuffle_mlp (2x2 patch merge + LayerNorm); LLaVA's projector is "
            "Linear -> GELU -> Linear on every patch"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(pixel_shuffle(x, square_grid(x))))


PROJECTOR = PixelShuffleMLPProjector
