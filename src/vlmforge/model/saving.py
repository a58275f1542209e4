"""vlmforge checkpoint folder: model.safetensors + config.yaml (the recipe) + tokenizer/
+ vision_config.json / llm_config.json (the exact architectures, so loading needs no download).

Tied weights (Qwen's lm_head = embed_tokens) are stored once: safetensors' save_model/load_model
handle shared tensors. Loading rebuilds the architecture from config.yaml (no download: the
tower and LLM are built from their configs, then every weight is loaded strictly).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model
from transformers.initialization import no_init_weights

from vlmforge.config import load_recipe, save_resolved
from vlmforge.config.recipe import Recipe
from vlmforge.errors import ConfigError
from vlmforge.model.build import build_vlm
from vlmforge.text.tokenization import load_tokenizer

WEIGHTS = "model.safetensors"
VISION_CONFIG = "vision_config.json"
LLM_CONFIG = "llm_config.json"


def save_vlm(model, tokenizer, cfg: Recipe, out_dir: str | os.PathLike) -> Path:
    """Write a checkpoint folder (weights in fp32 or their current dtype, tokenizer, resolved recipe)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_model(model, str(tmp), metadata={"format": "pt", "vlmforge": "vlm"})
    os.replace(tmp, out / WEIGHTS)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    model.vision.config.to_json_file(str(out / VISION_CONFIG))
    model.llm.config.to_json_file(str(out / LLM_CONFIG))
    save_resolved(cfg, out)
    return out


def _offline_arch(cfg: Recipe, ckpt: Path):
    """The recipe as stored, but building from configs only: weights come from model.safetensors,
    so architectures come from the saved config files (or a local `pretrained` folder's config.json)."""
    arch = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for part, saved in (("vision", VISION_CONFIG), ("llm", LLM_CONFIG)):
        if (ckpt / saved).is_file():
            arch.model[part].preset = str(ckpt / saved)
            arch.model[part].pretrained = None
            continue
        src = arch.model[part].pretrained
        if src:
            cfg_json = Path(src) / "config.json"
            if not cfg_json.is_file():
                raise ConfigError(
                    f"checkpoint built from {src!r}: its config.json is needed to rebuild the architecture "
                    "(a local folder); set model.%s.pretrained to a local copy with --set" % part
                )
            arch.model[part].preset = str(cfg_json)
            arch.model[part].pretrained = None
    return arch


def load_vlm(ckpt_dir: str | os.PathLike, overrides: Iterable[str] = (), device: str | torch.device = "cpu"):
    """(model, tokenizer, cfg) from a checkpoint folder; `overrides` are `key=value` recipe settings
    (e.g. model.projector.pool_size=null to run a pooled checkpoint at full resolution)."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / WEIGHTS).is_file() or not (ckpt / "config.yaml").is_file():
        raise ConfigError(f"{ckpt} is not a vlmforge checkpoint (needs {WEIGHTS} and config.yaml)")
    cfg = load_recipe(ckpt / "config.yaml", overrides)
    tok = load_tokenizer(ckpt / "tokenizer", trust_remote_code=bool(cfg.model.trust_remote_code))
    arch = _offline_arch(cfg, ckpt)
    with no_init_weights():  # every weight comes from the file: skip random init
        model = build_vlm(arch.model, tok, device=device, resize_vocab=False)
    missing, unexpected = load_model(model, str(ckpt / WEIGHTS), strict=True, device=str(device))
    model.eval()
    return model, tok, cfg

