"""Projectors: vision patch features [N, P, Dv] -> LLM-sized visual tokens [N, T, Dl].

One module per kind; each class answers how many tokens a patch grid gives (`tokens`), how it is
built from `model.projector` (`from_config`) and whether it exports to LLaVA (`export_refusal`).
They live in arch/ because the data layer needs the token count without importing the model.
Each module names its class as `PROJECTOR`; `PROJECTORS` maps `model.projector.kind` to it, read
from this folder.
"""

from __future__ import annotations

import sys

from torch import nn

from vlmforge.config.model import ProjectorConfig
from vlmforge.errors import ConfigError
from vlmforge.plugins import discover

PROJECTORS: dict[str, type[nn.Module]] = {cls.kind: cls for cls in discover(sys.modules[__name__], "PROJECTOR", nn.Module)}


def projector_class(kind: str) -> type[nn.Module]:
    try:
        return PROJECTORS[kind]
    except KeyError:
        raise ConfigError(f"model.projector.kind {kind!r} is not one of {', '.join(PROJECTORS)}") from None


def build_projector(proj_cfg: ProjectorConfig, vision_dim: int, llm_dim: int) -> nn.Module:
    return projector_class(proj_cfg.kind).from_config(proj_cfg, vision_dim, llm_dim)
