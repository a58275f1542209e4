"""Projectors: vision patch features [N, P, Dv] -> LLM-sized visual tokens [N, T, Dl].

One module per kind; each class answers how many tokens a patch grid gives (`tokens`), how it is
built from `model.projector` (`from_config`) and whether it exports to LLaVA (`export_refusal`).
They live in arch/ because the data layer needs the token count without importing the model.
`PROJECTORS` maps `model.projector.kind` to its class (tests/test_model.py checks that every
class in this folder is listed).
"""

from __future__ import annotations

from vlmforge.arch.projectors.avgpool_mlp import AvgPoolMLPProjector
from vlmforge.arch.projectors.mlp import MLPProjector
from vlmforge.arch.projectors.pixel_shuffle_mlp import PixelShuffleMLPProjector
from vlmforge.errors import ConfigError

PROJECTORS: dict[str, type[MLPProjector]] = {
    cls.kind: cls for cls in (AvgPoolMLPProjector, PixelShuffleMLPProjector, MLPProjector)
}


def projector_class(kind: str) -> type[MLPProjector]:
    try:
        return PROJECTORS[kind]
    except KeyError:
        raise ConfigError(f"model.projector.kind {kind!r} is not one of {', '.join(PROJECTORS)}") from None


def build_projector(proj_cfg, vision_dim: int, llm_dim: int) -> MLPProjector:
    return projector_class(proj_cfg.kind).from_config(proj_cfg, vision_dim, llm_dim)
